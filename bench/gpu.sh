#!/bin/bash
# The GPU paths through the commands a user runs (issue 15, docs/benchmarks.md "On a GPU"):
#   1. bench/extract.py --device cuda: the bare forward in fp32 / bf16 / fp16, NCHW and channels_last;
#   2. `hsl extract --device cuda` end to end, one new process per precision, on CATALOG's manifest;
#   3. `hsl train --device cuda`, 2 epochs per precision on the store step 2 wrote (the second epoch is
#      the figure: the first also pays cuDNN's choice of kernels and the allocator's first growth).
#   bench/gpu.sh CATALOG [OUT]     CATALOG: a folder with products.csv (id, productDisplayName) and images/{id}.jpg
set -u
CATALOG=$1
OUT=${2:-$(mktemp -d)}
PARTS=${PARTS:-1 2 3}  # which of the three to run
mkdir -p "$OUT"
H=${HSL:-hsl}
PY=${PYTHON:-python3}
N=$(($(wc -l < "$CATALOG/products.csv") - 1))
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "## $N products in $CATALOG; $(nproc) cores; torch $($PY -c 'import torch; print(torch.__version__)')"
t() { local s e; s=$(date +%s.%N); "$@" > "$OUT/last.log" 2>&1 || { echo "FAILED: $*"; tail -5 "$OUT/last.log"; }
      e=$(date +%s.%N); awk "BEGIN { printf \"%.1f\", $e - $s }"; }

if [[ " $PARTS " == *" 1 "* ]]; then
echo "## 1. bare forward and bench/extract.py's pipeline"
$PY bench/extract.py --device cuda --catalog "$CATALOG" --n 2048 --repeat 1 --batch-size 128
fi

if [[ " $PARTS " == *" 2 "* ]]; then
echo "## 2. hsl extract end to end (model load included): precision, batch size, decode workers"
for pbw in fp32:32:4 fp32:256:4 bf16:256:4 fp16:256:4 fp32:256:8 fp32:256:14; do
    IFS=: read -r p b w <<< "$pbw"
    rm -f "$OUT/s-$p-$b-$w.h5"
    secs=$(t "$H" extract "$CATALOG/products.csv" --store "$OUT/s-$p-$b-$w.h5" --text-column productDisplayName \
           --image-template 'images/{id}.jpg' --device cuda --precision "$p" --batch-size "$b" --workers "$w" --quiet)
    echo "extract --precision $p --batch-size $b --workers $w: $secs s, $(awk "BEGIN { printf \"%d\", $N / $secs }") images/s"
done
fi

[[ " $PARTS " == *" 3 "* ]] || exit 0
echo "## 3. hsl train, hsl-default, 2 epochs (epoch 2's seconds: training + validation)"
for p in fp32 bf16 fp16; do
  rm -rf "$OUT/train-$p"
  secs=$(t "$H" train --store "$OUT/s-fp32-256-4.h5" --out "$OUT/train-$p" --epochs 2 --device cuda --precision "$p" --quiet)
  $PY -c "import json, sys; h = json.load(open(sys.argv[1]))['history']; \
print(f'train --precision $p: whole command $secs s; epoch seconds', [round(e['seconds'], 2) for e in h])" \
    "$OUT/train-$p/metrics.json" 2>/dev/null || echo "train $p: no metrics ($secs s)"
done
