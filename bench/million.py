"""A million products through the commands a user runs, on this machine (issue 16).

1. **The store.** Extracting a million photos takes ~5 h on 2 cores, so the store is made from a
   real one (`--base`, e.g. the 7,427-photo catalog extracted by `hsl extract`): row i is the base
   row i mod B with its regions, whole-image vector and title tokens scaled by seeded Gaussian
   factors (`perturbed`), its title suffixed " #i" and its id "BASEID-i", written through the
   library's own writer (`FeatureStore.build` + `write_features` + DONE status), so it is the real
   layout and the real codes. This step is the only shortcut, and it is named here and in the table.
2. `hsl index` (wall time, peak RSS by /usr/bin/time).
3. `hsl query` cold (new process each, 5 runs) and warm (in-process, the 120 attribute queries):
   p50/p95 and recall@10 of the `auto` backend against `--backend exact`.
4. `hsl serve` search at 1 and 8 clients (bench/serve.py).
5. `hsl train --max-products 200000 --epochs 1` (epoch seconds and peak RSS from metrics.json).
6. The incremental index: 1 % of the rows re-extracted (status PENDING -> features -> DONE with a
   new mtime, as `hsl extract` does for changed photos, through the same library calls), then
   `hsl index` again: wall time against the full build.
7. Disk bytes per product.

    python bench/million.py --base /tmp/s2/fashion.h5 --out /tmp/m1 [--n 1000000] [--steps store index ...]

Prints a JSON record per step and writes them all to OUT/million.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HSL = str(Path(sys.executable).with_name("hsl"))
QUERIES = ROOT / "data" / "queries" / "fashion_attributes.jsonl"
STEPS = ("store", "index", "query", "serve", "train", "update", "disk")
BLOCK = 4096


def log(record: dict, out: Path) -> None:
    record = {**record, "load": os.getloadavg(), "at": time.strftime("%H:%M:%S")}
    print(json.dumps(record), flush=True)
    with open(out / "million.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


def timed(command: list[str]) -> dict:
    """Run a command under /usr/bin/time -v: wall seconds, peak RSS (MB), exit status, last output."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return {"seconds": round(time.perf_counter() - started, 2),
            "peak_rss_mb": int(peak.group(1)) / 1024 if peak else None, "rc": done.returncode,
            "tail": (done.stdout + done.stderr).strip().splitlines()[-3:]}


def perturbed(base: dict, index: np.ndarray, rng: np.random.Generator) -> dict:
    """Base features of `index`, each vector times (1 + 0.1 g): g ~ N(0, 1) per row and channel (shared by the
    row's regions, as a photo's lighting or colour would move them), plus 0.1 h per region (its own scale):
    every product is distinct, and drawing R + D numbers per row instead of R x D keeps the million-row
    build within minutes on 2 cores. The writer then quantizes them as extraction does."""
    out = {name: values[index] for name, values in base.items()}
    n = len(index)
    for name in ("image_global", "regions", "text_tokens"):
        values = out[name].astype(np.float32)
        per_channel = 1.0 + 0.1 * rng.standard_normal((n, *[1] * (values.ndim - 2), values.shape[-1]), np.float32)
        per_vector = 1.0 + 0.1 * rng.standard_normal((*values.shape[:-1], 1), np.float32)
        out[name] = values * per_channel * per_vector
    out["text_tokens"] *= (np.arange(out["text_tokens"].shape[1]) < out["text_lengths"][:, None])[..., None]
    return out


def build_store(base_path: Path, store: Path, n: int, seed: int = 0) -> dict:
    from hsl.store import DONE, FeatureStore, RowPlan

    started = time.perf_counter()
    with FeatureStore.open(base_path) as base:
        done = np.flatnonzero(base.column("status") == DONE)
        meta = {k: v for k, v in base.meta.items() if k not in ("schema_version", "attribute_columns")}
        columns = list(base.meta["attribute_columns"])
        ids, texts, images = (base.strings(name, done) for name in ("ids", "texts", "images"))
        attributes = base.attributes(done)
        features = base.read_features(done)
    b = len(done)
    rows = [RowPlan(f"{ids[i % b]}-{i}", images[i % b], f"{texts[i % b]} #{i}",
                    {c: attributes[c][i % b] for c in columns}, 1, i) for i in range(n)]
    FeatureStore.build(store, meta, rows, columns)
    del rows
    rng = np.random.default_rng(seed)
    with FeatureStore.open(store, writable=True) as writable:
        for start in range(0, n, BLOCK):
            index = np.arange(start, min(start + BLOCK, n))
            writable.write_features(index, perturbed(features, index % b, rng))
            writable.flush()
            writable.set_column("status", index, DONE)
    return {"step": "store", "products": n, "base": str(base_path), "base_products": b,
            "seconds": round(time.perf_counter() - started, 1), "file_bytes": store.stat().st_size,
            "bytes_per_product": round(store.stat().st_size / n)}


def queries(limit: int = 120) -> list[str]:
    with open(QUERIES, encoding="utf-8") as handle:
        return [json.loads(line)["query"] for line in handle if line.strip()][:limit]


def query_step(store: Path) -> list[dict]:
    records = []
    cold = [timed([HSL, "query", "red floral summer dress", "--store", str(store), "--top-k", "10", "--quiet"])
            for _ in range(5)]
    records.append({"step": "query-cold", "seconds": [c["seconds"] for c in cold],
                    "median": statistics.median(c["seconds"] for c in cold),
                    "peak_rss_mb": max(c["peak_rss_mb"] for c in cold), "rc": [c["rc"] for c in cold]})
    script = f"""
import json, statistics, time, resource
from hsl.search import Searcher
texts = {queries()!r}
auto = Searcher({str(store)!r})
times, found = [], []
for t in texts:
    s = time.perf_counter(); hits = auto.search(t, top_k=10).hits; times.append(time.perf_counter() - s)
    found.append([h.id for h in hits])
auto.close()
exact = Searcher({str(store)!r}, backend="exact")
recall = statistics.mean(len(set(f) & {{h.id for h in exact.search(t, top_k=10).hits}}) / 10
                         for t, f in zip(texts, found))
times.sort()
print(json.dumps({{"backend": auto.index.backend, "p50_ms": round(1000 * times[len(times) // 2], 2),
                  "p95_ms": round(1000 * times[int(len(times) * 0.95)], 2), "recall@10": round(recall, 4),
                  "queries": len(texts), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    warm = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    record = json.loads(warm.stdout.strip().splitlines()[-1]) if warm.returncode == 0 else {"error": warm.stderr[-800:]}
    records.append({"step": "query-warm", **record})
    return records


def train_step(store: Path, out: Path) -> dict:
    folder = out / "train-200k"
    result = timed([HSL, "train", "--store", str(store), "--out", str(folder), "--max-products", "200000",
                    "--epochs", "1", "--quiet"])
    metrics = json.loads((folder / "metrics.json").read_text()) if result["rc"] == 0 else {}
    epoch = metrics.get("history", [{}])[-1]
    return {"step": "train", **result, "epoch_seconds": epoch.get("seconds"), "streamed": metrics.get("streamed"),
            "split": metrics.get("split"), "val": epoch.get("val")}


def update_step(store: Path, fraction: float = 0.01, seed: int = 1) -> dict:
    """Re-extract `fraction` of the rows the way `hsl extract` does for changed photos, then `hsl index`."""
    from hsl.extract import commit_batch
    from hsl.store import PENDING, FeatureStore

    rng = np.random.default_rng(seed)
    with FeatureStore.open(store, writable=True) as writable:
        n = len(writable)
        changed = np.sort(rng.choice(n, size=int(n * fraction), replace=False))
        mtimes = writable.column("file_mtime_ns")
        writable.set_column("status", changed, PENDING)
        writable.set_column("file_mtime_ns", changed, mtimes[changed] + 10**9)  # the photo's new mtime
        writable.flush()
        for start in range(0, len(changed), BLOCK):
            rows = changed[start:start + BLOCK]
            features = writable.read_features(rows)
            commit_batch(writable, rows, perturbed(features, np.arange(len(rows)), rng))
    result = timed([HSL, "index", "--store", str(store), "--quiet"])
    return {"step": "update", "changed": int(len(changed)), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="a real store to draw the products from")
    parser.add_argument("--out", type=Path, required=True, help="folder for the big store and the records")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / f"catalog-{args.n}.h5"
    log({"step": "machine", "platform": platform.platform(), "cpus": os.cpu_count(),
         "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}, args.out)
    for step in args.steps:
        if step == "store":
            log(build_store(args.base, store, args.n), args.out)
        elif step == "index":
            log({"step": "index", **timed([HSL, "index", "--store", str(store), "--quiet"])}, args.out)
        elif step == "query":
            for record in query_step(store):
                log(record, args.out)
        elif step == "serve":
            done = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--store", str(store),
                                   "--clients", "1", "8", "--endpoints", "search", "--seconds", "20"],
                                  capture_output=True, text=True)
            log({"step": "serve", "rc": done.returncode, "output": done.stdout.strip().splitlines()[-8:]}, args.out)
        elif step == "train":
            log(train_step(store, args.out), args.out)
        elif step == "update":
            log(update_step(store), args.out)
        elif step == "disk":
            index = sum(p.stat().st_size for p in store.with_name(store.name + ".index").glob("*"))
            size = store.stat().st_size
            log({"step": "disk", "store_bytes": size, "store_bytes_per_product": round(size / args.n),
                 "index_bytes": index, "index_bytes_per_product": round(index / args.n)}, args.out)


if __name__ == "__main__":
    main()
