#!/bin/bash
# fp32 against bf16 through the commands a user runs, on a real store (docs/benchmarks.md, issue 15).
# Each measurement is a new process, the two precisions alternate, and the load of the machine is
# logged before each one (other jobs on the same cores change every figure).
#   bench/precision.sh STORE [index] [query] [train]       e.g. bench/precision.sh /tmp/hsl15/fashion.h5 index
set -u
H=${HSL:-.venv/bin/hsl}
S=$1; shift
Q="red floral summer dress"
OUT=${OUT:-$(mktemp -d)}
load() { echo "## $(date +%T) load: $(cut -d' ' -f1-3 /proc/loadavg)"; }
t() { local s e; s=$(date +%s.%N); "$@" > /dev/null 2>&1; e=$(date +%s.%N); echo "$(echo "$e - $s" | bc) s: ${*:2}"; }
for what in "$@"; do
  case $what in
  index)  # the cache is removed first: each run is a full build
    for p in fp32 bf16 fp32 bf16 fp32 bf16; do
      rm -rf "$S.index"; load; t "$H" index --store "$S" --precision "$p" --quiet
    done ;;
  query)  # cold: a new process per query, the index already built in that precision
    for p in bf16 fp32; do
      "$H" index --store "$S" --precision "$p" --quiet
      for _ in 1 2 3 4 5; do load; t "$H" query "$Q" --store "$S" --top-k 5 --precision "$p" --quiet; done
    done ;;
  train)  # one epoch of hsl-default; metrics.json has the epoch's seconds (training + validation)
    for p in fp32 bf16 fp32 bf16; do
      rm -rf "$OUT/train-$p"; load
      t "$H" train --store "$S" --out "$OUT/train-$p" --epochs 1 --precision "$p" --quiet
      python3 -c "import json, sys; print('epoch seconds $p', json.load(open(sys.argv[1]))['history'][0]['seconds'])" \
        "$OUT/train-$p/metrics.json"
    done ;;
  esac
done
