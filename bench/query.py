"""Query speed: warm in-process latency at 10k/100k/1M products, and cold `hsl query` wall time.

Synthetic products: index vectors of the default model's size, drawn around the real catalog's
own index vectors (a real vector plus Gaussian noise of 0.5x the per-dimension spread), so the
ANN indexes see a realistic cluster structure. A warm query = MiniLM text encoding + the HSL text
side + the search (+ exact re-scoring of the candidates for ivf/hnsw). Each (size, backend) runs
in a child process, so its peak memory (ru_maxrss) is its own. Recall@10 is measured against the
exact matrix product over the same vectors.

    python bench/query.py --store fashion.h5 [--model DIR] [--sizes 10000 100000 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

QUERIES = Path(__file__).resolve().parents[1] / "data" / "queries" / "fashion_attributes.jsonl"


def synthesize(base: np.ndarray, n: int, path: Path, seed: int = 0) -> None:
    """An index file of n vectors around the real ones, written in blocks (1M x 1024 float32 = 4 GB)."""
    rng = np.random.default_rng(seed)
    spread = (base.std(axis=0, keepdims=True) * 0.5).astype(np.float32)
    with h5py.File(path, "w") as f:
        vectors = f.create_dataset("vectors", (n, base.shape[1]), dtype="f4")
        for start in range(0, n, 50_000):
            m = min(50_000, n - start)
            noise = rng.standard_normal((m, base.shape[1]), dtype=np.float32) * spread
            vectors[start:start + m] = base[rng.integers(0, len(base), m)] + noise
        f.create_dataset("rows", data=np.arange(n, dtype=np.int64))


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec
    from the parent, so a child would report the benchmark driver's peak instead of its own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def exact_top(path: Path, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Ground truth by blocks: [Q,k] positions of the best inner products."""
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), k), np.int64)
    with h5py.File(path, "r") as f:
        vectors = f["vectors"]
        for start in range(0, vectors.shape[0], 100_000):
            scores = queries @ vectors[start:start + 100_000].T  # [Q,b]
            ids = np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)
            all_scores = np.concatenate([best_scores, scores], axis=1)
            all_ids = np.concatenate([best_ids, ids], axis=1)
            pick = np.argsort(-all_scores, axis=1)[:, :k]
            best_scores = np.take_along_axis(all_scores, pick, 1)
            best_ids = np.take_along_axis(all_ids, pick, 1)
    return best_ids


def child(args: argparse.Namespace) -> None:
    import torch

    from hsl.backbones import create_text_encoder
    from hsl.factory import load_model
    from hsl.index import VectorSearch

    torch.set_grad_enabled(False)
    model, meta = load_model(args.model)
    encoder = create_text_encoder(meta["backbone"])
    texts = [json.loads(line)["query"] for line in QUERIES.read_text().splitlines()][: args.queries]
    started = time.perf_counter()
    index = VectorSearch(Path(args.index), args.backend, nprobe=args.nprobe, ef_search=args.ef)
    build = time.perf_counter() - started
    latencies, query_vectors, found = [], [], []
    for text in texts * 2:  # the first pass warms caches; only the second is timed
        t0 = time.perf_counter()
        features = encoder.encode_texts([text])
        mask = torch.arange(features.tokens.shape[1])[None] < features.lengths.clamp(min=1)[:, None]
        q = model.query_vectors(model.encode_text(features.tokens, mask))[0].numpy()
        positions, _ = index.search(q, 10)
        latencies.append(time.perf_counter() - t0)
        query_vectors.append(q)
        found.append(positions)
    latencies, query_vectors, found = latencies[len(texts):], query_vectors[len(texts):], found[len(texts):]
    peak_mb = peak_rss_mb()  # before the ground truth's own memory
    truth = exact_top(Path(args.index), np.stack(query_vectors))
    recall = statistics.mean(len(set(f.tolist()) & set(t.tolist())) / 10 for f, t in zip(found, truth, strict=True))
    print(json.dumps({"n": len(index), "backend": index.backend, "index_load_or_build_s": round(build, 2),
                      "p50_ms": round(1000 * statistics.median(latencies), 1),
                      "p95_ms": round(1000 * float(np.percentile(latencies, 95)), 1), "recall@10": round(recall, 4),
                      "peak_rss_mb": round(peak_mb)}))


def encode_rate(model_dir: str, grid_regions: int = 17, n: int = 4096) -> float:
    """Products/s of the HSL image side on synthetic features of the default sizes (index build)."""
    import torch

    from hsl.factory import load_model

    model, meta = load_model(model_dir)
    regions = torch.randn(n, grid_regions, meta["image_dim"])
    mask = torch.ones(n, grid_regions, dtype=torch.bool)
    with torch.no_grad():
        started = time.perf_counter()
        for start in range(0, n, 512):
            model.index_vectors(model.encode_image(regions[start:start + 512], mask[start:start + 512]))
    return n / (time.perf_counter() - started)


def cold_query(store: str, model: str | None, runs: int = 5) -> list[float]:
    command = [str(Path(sys.executable).with_name("hsl")), "query", "red floral summer dress", "--store", store,
               "--quiet", "--json"] + (["--model", model] if model else [])
    subprocess.run(command, check=True, capture_output=True)  # builds the index cache once
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="fashion.h5")
    parser.add_argument("--model", default=None, help="default: the shipped model")
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--backends", nargs="+", default=["exact", "ivf", "hnsw"])
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--ef", type=int, default=128)
    parser.add_argument("--hnsw-max", type=int, default=100_000, help="largest size to build HNSW for")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--index", default=None)
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()
    from hsl.search import DEFAULT_MODEL, Searcher

    args.model = args.model or str(DEFAULT_MODEL)
    if args.child:
        child(args)
        return
    times = cold_query(args.store, None if args.model == str(DEFAULT_MODEL) else args.model)
    print(f"cold `hsl query` on {args.store}: median {statistics.median(times):.2f}s, max {max(times):.2f}s "
          f"over {len(times)} runs")
    rate = encode_rate(args.model)
    print(f"HSL image side (index build): {rate:,.0f} products/s on synthetic features of the default sizes")
    base = Searcher(args.store, args.model).index.matrix.numpy()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for n in args.sizes:
            path = Path(tmp) / f"synthetic-{n}.h5"
            synthesize(base, n, path)
            for backend in args.backends:
                if backend == "exact" and n * base.shape[1] * 4 > 2 * 1024**3:
                    continue  # over 2 GB of float32 vectors: not a contender for the memory target
                if backend == "hnsw" and n > args.hnsw_max:
                    continue  # building HNSW over 1M x 1024 takes far longer than this benchmark's budget
                command = [sys.executable, __file__, "--child", "--index", str(path), "--backend", backend,
                           "--model", args.model, "--queries", str(args.queries), "--nprobe", str(args.nprobe),
                           "--ef", str(args.ef)]
                out = subprocess.run(command, check=True, capture_output=True, text=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                result["encode_s_estimate"] = round(n / rate, 1)
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
