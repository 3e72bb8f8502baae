"""Milvus Lite (`--backend milvus`, hsl/milvus.py) against faiss (`auto`, `exact`) at 100k-1M products, in one run.

Products: the real catalog's HSL index vectors (the shipped model over the 7,427 photos of
../shared/data/fashion, read from an existing index cache, `--source`), replicated to N products:
product i = real product (i mod 7,427) + seeded Gaussian noise of 0.3 x its norm (cosine to its
original ~0.96; two real neighbours have cosine ~0.89 at the median), with that real product's
attributes (8 columns). They are written as an index cache file ([N,1024] float32 + rows), so the
backends read exactly what `hsl index` would give them; no feature store of N products is built
(one of 1M products would take ~150 GB), hence the small subclass of MilvusSearch below that takes
ids and attributes from the source instead of a store. Queries: 200 titles of random real
products, encoded by the shipped model as `hsl query` encodes them (the text side of HSL), so a
query = the engine's search + exact re-scoring of its candidates, no text encoding (~8 ms more).

Each backend runs in a child process of its own, so its RSS is its own: faiss and numpy, or the
Milvus Lite server embedded in the process (what `hsl query --backend milvus` with a .db path
runs). Build = from nothing to a search-ready index: for Milvus, the upserts, flush and index
build of `MilvusSearch.sync`; then a re-sync with nothing changed, and one after 1% of the
products changed an attribute (what `hsl index` sends after a small catalog update).

    nice -n 10 python bench/milvus.py --sizes 100000 1000000 --json /tmp/hsl-milvus/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/scale.py: spinning threads on shared cores
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsl.milvus import MilvusOptions, MilvusSearch  # noqa: E402

FASHION = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion"
QUERIES, WARM_UP, K = 200, 20, 10
NOISE = 0.3
BLOCK = 50_000


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024)
    return float("nan")


def load() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


# -- data ---------------------------------------------------------------------------------------------
def write_index(path: Path, source: Path, n: int, seed: int = 0) -> None:
    """An index cache file of n products made from the real vectors (module docstring)."""
    if path.is_file():
        return
    with h5py.File(source, "r") as f:
        real = f["vectors"][:int(f.attrs.get("count", len(f["vectors"])))].astype(np.float32)  # the used rows
        attrs = dict(f.attrs)
    scale = (NOISE * np.linalg.norm(real, axis=1) / np.sqrt(real.shape[1])).astype(np.float32)  # per-dim std
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        vectors = f.create_dataset("vectors", (n, real.shape[1]), dtype="f4")
        for start in range(0, n, BLOCK):
            source_rows = np.arange(start, min(n, start + BLOCK)) % len(real)
            rng = np.random.default_rng([seed, start])
            noise = rng.standard_normal((len(source_rows), real.shape[1]), dtype=np.float32)
            vectors[start:start + len(source_rows)] = real[source_rows] + noise * scale[source_rows, None]
        f.create_dataset("rows", data=np.arange(n, dtype=np.int64))
        f.attrs.update({**attrs, "store_fingerprint": f"bench-{n}-{seed}", "count": n})
    os.replace(tmp, path)


def catalog(store: Path, n: int) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """(columns, ids, attributes) of n products: product i has real product (i mod R)'s attributes."""
    from hsl.store import FeatureStore

    with FeatureStore.open(store) as opened:
        attributes = opened.attributes()
    columns = list(attributes)
    real = len(next(iter(attributes.values())))
    ids = [f"p{i}" for i in range(n)]
    return columns, ids, {c: [values[i % real] for i in range(n)] for c, values in attributes.items()}


def encode_queries(path: Path, store: Path, count: int = QUERIES, seed: int = 1) -> None:
    """Query vectors of `count` real titles, as `hsl query` makes them (shipped model, auto precision)."""
    if path.is_file():
        return
    import torch

    from hsl.backbones import create_text_encoder
    from hsl.factory import load_model
    from hsl.precision import resolve_precision
    from hsl.search import DEFAULT_MODEL
    from hsl.store import FeatureStore

    with FeatureStore.open(store) as opened:
        texts = opened.strings("texts")
        meta = dict(opened.meta)
    picked = [texts[i] for i in np.random.default_rng(seed).choice(len(texts), count, replace=False)]
    precision = resolve_precision("auto", torch.device("cpu"))
    model, _ = load_model(DEFAULT_MODEL)
    model.eval().use_precision(precision)
    encoder = create_text_encoder(meta["backbone"], max_text_tokens=meta["max_text_tokens"]).use_precision(precision)
    out = []
    with torch.no_grad():
        for text in picked:
            features = encoder.encode_texts([text])
            mask = torch.arange(features.tokens.shape[1])[None] < features.lengths.clamp(min=1)[:, None]
            out.append(model.query_vectors(model.encode_text(features.tokens, mask))[0].float().numpy())
    np.save(path, np.stack(out).astype(np.float32))
    path.with_suffix(".txt").write_text("\n".join(picked) + "\n", encoding="utf-8")


def exact_top(index: Path, queries: np.ndarray, out: Path) -> np.ndarray:
    """The exact top K of every query, streamed over the vectors in blocks."""
    if out.is_file():
        return np.load(out)
    best_scores = np.full((len(queries), K), -np.inf, np.float32)
    best = np.zeros((len(queries), K), np.int64)
    with h5py.File(index, "r") as f:
        vectors = f["vectors"]
        for start in range(0, len(vectors), BLOCK):
            scores = queries @ vectors[start:start + BLOCK].T  # [Q,B]
            scores_all = np.concatenate([best_scores, scores], axis=1)
            ids_all = np.concatenate([best, np.arange(start, start + scores.shape[1])[None].repeat(len(queries), 0)],
                                     axis=1)
            top = np.argsort(-scores_all, axis=1, kind="stable")[:, :K]
            best_scores = np.take_along_axis(scores_all, top, 1)
            best = np.take_along_axis(ids_all, top, 1)
    np.save(out, best)
    return best


# -- children ---------------------------------------------------------------------------------------
class BenchMilvus(MilvusSearch):
    """MilvusSearch with ids and attributes from the replicated catalog instead of a feature store."""

    source_store: Path
    changed = 0  # products whose attribute is changed (the "1% changed" re-sync)

    def catalog(self) -> tuple[list[str], list[str]]:
        columns, ids, self._bench_attributes = catalog(self.source_store, len(self.rows))
        return columns, ids

    def attributes(self) -> dict[str, list[str]]:
        attributes = {c: list(v) for c, v in self._bench_attributes.items()}
        column = next(iter(attributes))
        for i in range(self.changed):
            attributes[column][i * (len(self.rows) // max(1, self.changed))] += " (changed)"
        return attributes

    def fingerprint(self) -> str:
        return super().fingerprint() + (f"-changed{self.changed}" if self.changed else "")


def timed_queries(search: object, queries: np.ndarray, truth: np.ndarray) -> dict:
    for q in queries[:WARM_UP]:
        search(q)
    times, hits = [], 0
    for q, want in zip(queries, truth, strict=True):
        started = time.perf_counter()
        positions = search(q)
        times.append((time.perf_counter() - started) * 1000)
        hits += len(set(positions[:K].tolist()) & set(want.tolist()))
    times.sort()
    return {"p50_ms": round(statistics.median(times), 2), "p95_ms": round(times[int(0.95 * len(times)) - 1], 2),
            "recall@10": round(hits / (K * len(queries)), 4)}


def child(args: argparse.Namespace) -> dict:
    work = Path(args.work) / str(args.size)
    index = work / "index.h5"
    queries = np.load(Path(args.work) / "queries.npy")
    truth = np.load(work / "truth.npy")
    result = {"size": args.size, "backend": args.child, "load_before": load(), "rss_before_mb": status_mb("VmRSS")}
    started = time.perf_counter()
    if args.child == "milvus":
        db = work / "lite.db"
        shutil.rmtree(db, ignore_errors=True)
        BenchMilvus.source_store = Path(args.store)
        options = MilvusOptions(uri=str(db), index=args.milvus_index)
        engine = BenchMilvus(index, args.store, "bench", options)
        result.update(index=engine.index_type, build_s=round(time.perf_counter() - started, 1),
                      upserted=engine.report.upserted)
        search = engine.search
    else:
        from hsl.index import VectorSearch

        for stale in work.glob("index.*.faiss"):
            stale.unlink()  # build from nothing
        engine = VectorSearch(index, args.child)
        result.update(index=engine.backend, build_s=round(time.perf_counter() - started, 1))
        search = engine.search
    result["rss_loaded_mb"] = status_mb("VmRSS")
    started = time.perf_counter()
    search(queries[0], K)
    result["first_query_s"] = round(time.perf_counter() - started, 2)
    result.update(timed_queries(lambda q: search(q, K)[0], queries, truth))
    if args.child == "milvus":
        engine.close()
        for changed in (0, args.size // 100):  # re-sync: nothing changed, then 1% of the products
            BenchMilvus.changed = changed
            started = time.perf_counter()
            again = BenchMilvus(index, args.store, "bench", options)
            result[f"resync_{'unchanged' if not changed else 'changed_1pct'}_s"] = round(
                time.perf_counter() - started, 1)
            result[f"resync_{'unchanged' if not changed else 'changed_1pct'}_upserted"] = again.report.upserted
            again.close()
        result["disk_mb"] = round(sum(f.stat().st_size for f in db.rglob("*") if f.is_file()) / 2**20)
    result.update(peak_rss_mb=status_mb("VmHWM"), rss_end_mb=status_mb("VmRSS"), load_after=load())
    return result


def run_child(args: argparse.Namespace, backend: str, size: int) -> dict:
    command = [sys.executable, __file__, "--child", backend, "--size", str(size), "--work", args.work,
               "--store", args.store, "--milvus-index", args.milvus_index]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode:
        return {"size": size, "backend": backend, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--backends", nargs="+", default=["auto", "exact", "milvus"])
    parser.add_argument("--milvus-index", default="auto", help="HNSW (auto), IVF_FLAT, IVF_SQ8, FLAT")
    parser.add_argument("--milvus-sizes", type=int, nargs="*", default=None,
                        help="sizes at which milvus runs (default: every size; Milvus Lite takes minutes per 100k)")
    parser.add_argument("--source", default="", help="an index cache of the real catalog (default: find one)")
    parser.add_argument("--store", default=str(Path(__file__).resolve().parents[2] / "main" / "fashion.h5"),
                        help="the real catalog's store: attributes and query titles")
    parser.add_argument("--work", default="/tmp/hsl-milvus")
    parser.add_argument("--json", default="")
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--child", default="")
    parser.add_argument("--size", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    source = Path(args.source) if args.source else next(Path(args.store + ".index").glob("*.h5"))
    Path(args.work).mkdir(parents=True, exist_ok=True)
    encode_queries(Path(args.work) / "queries.npy", Path(args.store))
    queries = np.load(Path(args.work) / "queries.npy")
    print(f"machine: {os.cpu_count()} cores, {os.uname().machine}; load {load()}; source {source}", flush=True)
    busy = subprocess.run(["ps", "-eo", "pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    print("busiest processes:\n" + "\n".join(line[:160] for line in busy.splitlines()[1:5]), flush=True)
    for size in args.sizes:
        work = Path(args.work) / str(size)
        work.mkdir(exist_ok=True)
        started = time.perf_counter()
        write_index(work / "index.h5", source, size)
        exact_top(work / "index.h5", queries, work / "truth.npy")
        print(f"{size}: data + ground truth ready ({time.perf_counter() - started:.0f} s)", flush=True)
        for backend in args.backends:
            if backend == "milvus" and args.milvus_sizes is not None and size not in args.milvus_sizes:
                print(json.dumps({"size": size, "backend": backend, "skipped": "not in --milvus-sizes"}), flush=True)
                continue
            result = run_child(args, backend, size)
            print(json.dumps(result), flush=True)
            if args.json:
                with open(args.json, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
