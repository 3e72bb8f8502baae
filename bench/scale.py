"""Search at 1M-10M products: the `ivfpq` backend (hsl/ann.py) on synthetic clustered vectors.

Products: a seeded Gaussian mixture in the default model's index dimension (1,024), stored on
disk as a float16 .npy memmap and generated block by block (10M x 1024 x 2 B = 20 GB), never all
in RAM. Each product = one of 1,024 centres (norm ~1) + a Gaussian offset in a 64-d subspace
shared by all clusters with decaying scales (norm ~0.33) + noise in every dimension (norm ~0.3)
picked from a seeded bank of 65,536 Gaussian vectors. Queries: 200 random products + Gaussian
noise of norm ~0.4 (a product's norm is ~1.1), L2-normalised. Ground truth: the exact top 10
by inner product, streamed over the vectors in blocks.

Per size, each step writes its output to --work and is skipped when the output is there, so a
killed run restarts where it stopped (generation resumes at the last finished block). Build and
queries run in child processes so that each one's peak RSS (VmHWM) is its own. A query = the PCA
projection + the IVF-PQ probe of every shard + reading the candidates' float16 vectors from the
memmap + exact re-scoring; no text encoding (bench/query.py measures that part: ~8 ms).

    nice -n 10 python bench/scale.py --sizes 1000000 10000000 --json scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# Sleeping instead of spinning at OpenMP barriers: on cores shared with another busy job, spinning
# threads made faiss training 2.6x slower (measured: 31 s -> 12 s on a 20k-product smoke run).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

BLOCK = 100_000
CENTRES, SUBSPACE = 1024, 64


def vmhwm_mb(field: str = "VmHWM") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def generate(path: Path, n: int, dims: int, seed: int = 0) -> None:
    """Write n products block by block; each block has its own seed, so a restart resumes at a block."""
    done_file = path.with_suffix(".blocks")
    done = int(done_file.read_text()) if done_file.exists() and path.exists() else 0
    mode = "r+" if done else "w+"
    vectors = np.lib.format.open_memmap(path, mode=mode, dtype=np.float16, shape=(n, dims))
    rng = np.random.default_rng([seed, 0])
    centres = rng.standard_normal((CENTRES, dims), dtype=np.float32) / np.sqrt(dims)  # [C,D], norm ~1
    basis = np.linalg.qr(rng.standard_normal((dims, SUBSPACE)))[0].T.astype(np.float32)  # [S,D] orthonormal
    scales = (0.15 / np.sqrt(np.arange(1, SUBSPACE + 1))).astype(np.float32)  # decaying spectrum
    # Every dimension's noise comes from a bank of 65,536 vectors (norm ~0.3): drawing 1,024 fresh
    # random numbers per product made generating 10M products take most of an hour on the shared cores.
    bank = rng.standard_normal((65536, dims), dtype=np.float32) * np.float32(0.3 / np.sqrt(dims))
    for block, start in enumerate(range(0, n, BLOCK)):
        if block < done:
            continue
        rng = np.random.default_rng([seed, 1, block])
        m = min(BLOCK, n - start)
        x = centres[rng.integers(0, CENTRES, m)]
        x += (rng.standard_normal((m, SUBSPACE), dtype=np.float32) * scales) @ basis
        x += bank[rng.integers(0, len(bank), m)]
        vectors[start:start + m] = x
        vectors.flush()
        done_file.write_text(str(block + 1))
        print(f"  generated {start + m:,}/{n:,}", file=sys.stderr, flush=True)
    done_file.write_text("done")


def make_queries(vectors: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(vectors), count, replace=False))
    q = vectors[picks].astype(np.float32)
    q += rng.standard_normal(q.shape, dtype=np.float32) * (0.4 / np.sqrt(q.shape[1]))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """[Q,k] positions of the best inner products, best first, streaming 200k rows at a time."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    for start in range(0, len(vectors), 200_000):
        scores = queries @ vectors[start:start + 200_000].astype(np.float32).T  # [Q,b]
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        all_s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], 1)
        all_i = np.concatenate([best_i, top + start], 1)
        pick = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(all_s, pick, 1), np.take_along_axis(all_i, pick, 1)
    return best_i


def child_build(args: argparse.Namespace) -> dict:
    from hsl.ann import IVFPQOptions, train, write_shards

    vectors = np.load(args.vectors, mmap_mode="r")
    opts = IVFPQOptions(nlist=args.nlist, m=args.m, dim=args.pca_dim, shards=args.shards)
    opts = opts.resolved(*vectors.shape)
    started = time.perf_counter()
    trained = train(vectors, opts)
    trained_at = time.perf_counter()
    write_shards(trained, vectors, opts, shard_paths(args, opts))
    return {"tag": opts.tag(), "nlist": opts.nlist, "train_s": round(trained_at - started, 1),
            "add_s": round(time.perf_counter() - trained_at, 1), "build_peak_rss_mb": round(vmhwm_mb())}


def shard_paths(args: argparse.Namespace, opts: object) -> list[Path]:
    return [Path(args.vectors).with_name(f"{Path(args.vectors).stem}.{opts.tag()}.{i}.faiss")
            for i in range(opts.shards)]


def child_query(args: argparse.Namespace) -> list[dict]:
    from hsl.ann import IVFPQOptions, ShardedIVFPQ

    vectors = np.load(args.vectors, mmap_mode="r")
    opts = IVFPQOptions(nlist=args.nlist, m=args.m, dim=args.pca_dim, shards=args.shards).resolved(*vectors.shape)
    queries, truth = np.load(args.queries_file), np.load(args.truth_file)
    rss_before = vmhwm_mb("VmRSS")
    # mmap=False: the codes in RAM, the deployment figure
    index = ShardedIVFPQ(vectors, shard_paths(args, opts), mmap=False, threads=args.threads or None)
    rss_loaded = vmhwm_mb("VmRSS")
    rows = []
    passes = [(p, r, False) for p in args.nprobes for r in args.reranks]
    passes += [(p, r, True) for p, r, _ in passes] if args.cold else []
    for nprobe, rerank, cold in passes:
        index.nprobe, index.rerank = nprobe, rerank
        for q in queries[:20]:  # warm-up: thread pool, first page faults of the code arrays
            index.search(q, 10)
        if cold:  # evict this file's cached pages (only this file's): re-ranking reads come from the disk
            index.vectors = vectors = None  # unmap first: the kernel keeps pages that are mapped anywhere
            with open(args.vectors, "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            index.vectors = vectors = np.load(args.vectors, mmap_mode="r")
        latencies, recalls = [], []
        for q, want in zip(queries, truth, strict=True):
            t0 = time.perf_counter()
            found, _ = index.search(q, 10)
            latencies.append(time.perf_counter() - t0)
            recalls.append(len(set(found.tolist()) & set(want.tolist())) / 10)
        rows.append({"nprobe": nprobe, "rerank": rerank, "cold": cold,
                     "p50_ms": round(1000 * statistics.median(latencies), 2),
                     "p95_ms": round(1000 * float(np.percentile(latencies, 95)), 2),
                     "recall@10": round(statistics.mean(recalls), 4)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    common = {"index_bytes": index.memory_bytes(), "rss_before_index_mb": round(rss_before),
              "rss_index_loaded_mb": round(rss_loaded), "query_peak_rss_mb": round(vmhwm_mb()),
              # the peak counts memmapped vector pages (page cache, shared, evictable); RssAnon is the process's own
              "rss_anon_end_mb": round(vmhwm_mb("RssAnon")), "rss_file_end_mb": round(vmhwm_mb("RssFile"))}
    return [{**row, **common} for row in rows]


def run_child(kind: str, args: argparse.Namespace, extra: list[str]) -> object:
    command = [sys.executable, __file__, "--child", kind, *(["--cold"] if args.cold else []),
               "--nlist", str(args.nlist), "--m", str(args.m),
               "--pca-dim", str(args.pca_dim), "--shards", str(args.shards), "--threads", str(args.threads),
               *extra]
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_size(args: argparse.Namespace, n: int) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    vec = work / f"vectors-{n}x{args.dim}.npy"
    if not (vec.with_suffix(".blocks").exists() and vec.with_suffix(".blocks").read_text() == "done"):
        started = time.perf_counter()
        generate(vec, n, args.dim)
        print(f"n={n:,}: generated in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    qfile, tfile = work / f"queries-{n}.npy", work / f"truth-{n}.npy"
    if not tfile.exists():
        vectors = np.load(vec, mmap_mode="r")
        queries = make_queries(vectors, args.queries)
        started = time.perf_counter()
        np.save(tfile.with_suffix(".tmp.npy"), exact_top(vectors, queries))
        np.save(qfile, queries)
        tfile.with_suffix(".tmp.npy").replace(tfile)
        print(f"n={n:,}: exact ground truth in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    files = ["--vectors", str(vec)]
    build_file = work / f"build-{n}-m{args.m}-d{args.pca_dim}-l{args.nlist}-s{args.shards}.json"
    build = json.loads(build_file.read_text()) if build_file.exists() else None
    if build is None or not list(work.glob(f"{vec.stem}.{build['tag']}.*.faiss")):  # shards deleted: rebuild
        build = run_child("build", args, files)
        build_file.write_text(json.dumps(build))
    print(f"n={n:,}: build {build}", file=sys.stderr, flush=True)
    rows = run_child("query", args, [*files, "--queries-file", str(qfile), "--truth-file", str(tfile),
                                     "--nprobes", *map(str, args.nprobes), "--reranks", *map(str, args.reranks)])
    index_files = sorted(vec.parent.glob(f"{vec.stem}.{build['tag']}.*.faiss"))
    return {"n": n, "dim": args.dim, "m": args.m, "pca_dim": args.pca_dim, "shards": args.shards,
            "threads": args.threads, **build,
            "index_file_bytes": sum(f.stat().st_size for f in index_files), "queries": args.queries, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1_000_000, 10_000_000])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--work", default="/tmp/hsl-scale", help="vectors, index shards, ground truth")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--nlist", type=int, default=0, help="0: the backend's automatic choice")
    parser.add_argument("--m", type=int, default=64)
    parser.add_argument("--pca-dim", type=int, default=256)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="shards searched at once (0: one per core)")
    parser.add_argument("--nprobes", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--reranks", nargs="+", type=int, default=[100, 200, 400])
    parser.add_argument("--cold", action="store_true", help="also run each setting with the vectors evicted "
                        "from the page cache (posix_fadvise DONTNEED) before its queries")
    parser.add_argument("--json", default=None, help="append one JSON line per size to this file")
    parser.add_argument("--delete", action="store_true", help="delete the size's vectors and shards afterwards")
    parser.add_argument("--child", default=None)
    parser.add_argument("--vectors", default=None)
    parser.add_argument("--queries-file", default=None)
    parser.add_argument("--truth-file", default=None)
    args = parser.parse_args()
    if args.child:
        run = child_build if args.child == "build" else child_query
        print(json.dumps(run(args)))
        return
    for n in args.sizes:
        result = run_size(args, n)
        print(json.dumps(result), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
        if args.delete:
            for path in Path(args.work).glob(f"vectors-{n}x{args.dim}*"):
                path.unlink()


if __name__ == "__main__":
    main()
