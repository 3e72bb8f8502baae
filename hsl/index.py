"""The image side of HSL, computed once per (store, model) and cached beside the store.

With AGG = mean, HSL ranking is one maximum-inner-product search over one vector per product
(DESIGN.md §2): the cache holds those vectors. The file is rebuilt when the model or the store's
rows change, written to a temporary name and atomically renamed, so a killed `hsl index` never
leaves a half-written cache that a query would trust.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import torch

from .ann import IVFPQOptions, ShardedIVFPQ, best_exact, build, read_rows
from .dataset import load_products
from .errors import HSLUsageError
from .store import DONE, FeatureStore, ensure_space

INDEX_VERSION = 1
_BLOCK = 512
BACKENDS = ("auto", "exact", "flat", "ivf", "hnsw", "ivfpq", "milvus")  # milvus: hsl/milvus.py, never "auto"
EXACT_LIMIT_BYTES = 1 << 30  # "auto": exact in-RAM matrix product while the float32 vectors fit in 1 GB
# "auto": ivfpq (64 B of code per product) once ivf's 8-bit codes (1 B per dimension) would pass 4 GB,
# about 4M products of the default 1,024 dimensions (docs/scaling.md).
IVFPQ_FROM_BYTES = 4 << 30
RERANK_POOL = 200  # approximate backends: candidates re-scored exactly from the float32 vectors


def store_fingerprint(store: FeatureStore) -> str:
    """Changes whenever a row is added, re-extracted or finished (cheap: numeric columns only)."""
    digest = hashlib.sha256()
    for name in ("status", "file_size", "file_mtime_ns"):
        digest.update(np.ascontiguousarray(store.column(name)).tobytes())
    digest.update(str(len(store)).encode())
    return digest.hexdigest()[:16]


def index_path(store_path: str | os.PathLike, model_key: str) -> Path:
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + ".index") / f"{model_key}.h5"


def is_current(path: Path, fingerprint: str, precision: str = "fp32") -> bool:
    """Whether the cache holds the vectors of this store state, made in `precision` (older caches: fp32)."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return (f.attrs.get("store_fingerprint") == fingerprint and f.attrs.get("version") == INDEX_VERSION
                    and f.attrs.get("precision", "fp32") == precision)
    except OSError:  # a damaged cache is rebuilt, never trusted
        return False


@torch.no_grad()
def build_index(store_path: str | os.PathLike, model: torch.nn.Module, model_key: str,
                progress: Callable[[int, int], None] | None = None) -> Path:
    """Encode every extracted product's image side (in the model's precision) and write the index vectors."""
    with FeatureStore.open(store_path) as store:
        fingerprint = store_fingerprint(store)
        products = load_products(store, region_grid=model.config.region_grid)
        rows = np.flatnonzero(store.column("status") == DONE)
    path = index_path(store_path, model_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    model.eval()
    device = next(model.parameters()).device
    dims = model.index_vectors(model.encode_image(*products.image_batch(torch.arange(1), device))).shape[1]
    ensure_space(tmp, len(products) * (dims * 4 + 8) + (1 << 20), "queries keep using the old index, if any")
    with h5py.File(tmp, "w") as f:
        vectors = f.create_dataset("vectors", (len(products), dims), dtype="f4")
        for start in range(0, len(products), _BLOCK):
            index = torch.arange(start, min(start + _BLOCK, len(products)))
            block = model.index_vectors(model.encode_image(*products.image_batch(index, device))).cpu().numpy()
            vectors[start:start + len(block)] = block
            if progress:
                progress(start + len(block), len(products))
        f.create_dataset("rows", data=rows.astype(np.int64))
        f.attrs.update({"version": INDEX_VERSION, "store_fingerprint": fingerprint, "model": model_key,
                        "exact": bool(model.exact_by_inner_product), "precision": model.precision.name})
    for stale in path.parent.glob(f"{model_key}.*.faiss"):  # ANN files of the previous vectors
        stale.unlink()
    os.replace(tmp, path)
    return path


class VectorSearch:
    """Maximum inner product over the index vectors: exact (numpy or faiss flat) or approximate
    (faiss IVF or HNSW with 8-bit scalar-quantised codes, or sharded IVF-PQ, hsl/ann.py), whose
    candidates are re-scored exactly from the float32 vectors on disk."""

    def __init__(self, path: Path, backend: str = "auto", nprobe: int = 32, ef_search: int = 128,
                 ivfpq: IVFPQOptions | None = None) -> None:
        if backend not in BACKENDS:
            raise HSLUsageError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        if backend == "milvus":
            raise HSLUsageError("the milvus backend is hsl.milvus.MilvusSearch (Searcher picks it), not VectorSearch")
        self.path = path
        self._h5 = h5py.File(path, "r")
        self._vectors = self._h5["vectors"]
        self.rows = self._h5["rows"][:]
        n, dims = self._vectors.shape
        if backend == "auto":
            backend = ("exact" if n * dims * 4 <= EXACT_LIMIT_BYTES
                       else "ivf" if n * dims <= IVFPQ_FROM_BYTES else "ivfpq")
        self.backend = backend
        self.ann = self._ivfpq(replace(ivfpq or IVFPQOptions(), nprobe=nprobe)) if backend == "ivfpq" else None
        # torch, not numpy, for the product: mixing OpenBLAS's and torch's thread pools in one query
        # makes them spin against each other (measured: p50 16 ms instead of 8 ms at 10k products).
        self.matrix = torch.from_numpy(self._vectors[:]) if backend == "exact" else None  # [N,D] float32
        self.faiss_index = None if backend in ("exact", "ivfpq") else self._faiss_index(backend, nprobe, ef_search)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def exact(self) -> bool:
        return self.backend in ("exact", "flat")

    def _ivfpq(self, opts: IVFPQOptions) -> ShardedIVFPQ:
        opts = opts.resolved(*self._vectors.shape)
        files = [self.path.with_name(f"{self.path.stem}.{opts.tag()}.{i}.faiss") for i in range(opts.shards)]
        if not all(file.is_file() for file in files):
            build(self._vectors, opts, files)
        return ShardedIVFPQ(self._vectors, files, opts.nprobe, opts.rerank)

    def _faiss_index(self, backend: str, nprobe: int, ef_search: int) -> object:
        import faiss

        file = self.path.with_name(f"{self.path.stem}.{backend}.faiss")
        if file.is_file():  # IVF lists are memory-mapped: a query touches only the lists it probes
            index = faiss.read_index(str(file), faiss.IO_FLAG_MMAP if backend == "ivf" else 0)
        else:
            index = build_faiss_index(self._vectors, backend)
            tmp = file.with_name(file.name + ".tmp")
            faiss.write_index(index, str(tmp))
            os.replace(tmp, file)  # a killed build leaves no file a query would trust
        if backend == "ivf":
            index.nprobe = nprobe
        elif backend == "hnsw":
            index.hnsw.efSearch = ef_search
        return index

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(positions into self.rows, inner products) of the k best, best first; `allowed` [N] bool filters."""
        k = min(k, len(self.rows) if allowed is None else int(allowed.sum()))
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if self.ann is not None:
            return self.ann.search(query, k, allowed)
        if self.matrix is not None:
            scores = (self.matrix @ torch.from_numpy(query)).numpy()  # [N]
            if allowed is not None:
                scores = np.where(allowed, scores, -np.inf)
            top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
            top = top[np.lexsort((top, -scores[top]))]  # best first; equal scores in store order
            return top, scores[top]
        return self._faiss_search(query, k, allowed)

    def _faiss_search(self, query: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        params = None
        if allowed is not None:
            selector = faiss.IDSelectorBatch(np.flatnonzero(allowed).astype(np.int64))
            params = {"ivf": faiss.SearchParametersIVF, "hnsw": faiss.SearchParametersHNSW,
                      "flat": faiss.SearchParameters}[self.backend](sel=selector)
            if self.backend == "ivf":
                params.nprobe = self.faiss_index.nprobe
        pool = k if self.exact else max(k, RERANK_POOL)
        _, found = self.faiss_index.search(query[None].astype(np.float32), pool, params=params)
        found = found[0][found[0] >= 0]
        exact = read_rows(self._vectors, found) @ query  # float32 vectors from disk: the scores are exact again
        return (found, exact) if self.exact else best_exact(found, exact, k)

    def close(self) -> None:
        if self.ann is not None:
            self.ann.close()
        self._h5.close()


def build_faiss_index(vectors: h5py.Dataset, backend: str) -> object:
    """faiss index over the stored vectors, added block by block (never all float32 vectors at once)."""
    import faiss

    n, dims = vectors.shape
    if backend == "flat":
        index = faiss.IndexFlatIP(dims)
    elif backend == "hnsw":
        index = faiss.IndexHNSWSQ(dims, faiss.ScalarQuantizer.QT_8bit, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    else:
        nlist = max(1, min(4096, int(np.sqrt(n))))
        quantizer = faiss.IndexFlatIP(dims)
        index = faiss.IndexIVFScalarQuantizer(quantizer, dims, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        sample = np.sort(np.random.default_rng(0).choice(n, size=min(n, 64 * 1024), replace=False))
        index.train(vectors[sample])
    for start in range(0, n, 65536):
        index.add(vectors[start:start + 65536])
    return index
