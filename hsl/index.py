"""Maximum inner product over the index vectors that hsl/index_cache.py keeps beside the store.

`exact` multiplies the float32 vectors in RAM; `flat`, `ivf` and `hnsw` are faiss indexes and
`ivfpq` the sharded IVF-PQ of hsl/ann.py, each saved next to the cache under the cache's
generation, and candidates of the approximate ones are re-scored exactly from the vectors on disk.
When the cache was updated in place, the IVF file of the previous generation is updated with the
positions that changed (remove + add); the other ANN kinds are built again.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np

from .ann import IVFPQOptions, ShardedIVFPQ, best_exact, build, matvec, read_rows, write_index
from .errors import HSLUsageError
from .index_cache import RowReader, UsedRows, cache_rows, candidate_rows
from .options import EF_SEARCH, NPROBE, RERANK_POOL
from .top_k import top_k

BACKENDS = ("auto", "exact", "flat", "ivf", "hnsw", "ivfpq", "milvus")  # milvus: hsl/milvus.py, never "auto"
EXACT_LIMIT_BYTES = 1 << 30  # "auto": exact in-RAM matrix product while the float32 vectors fit in 1 GB
# "auto": ivfpq (64 B of code per product) once ivf's 8-bit codes (1 B per dimension) would pass 4 GB,
# about 4M products of the default 1,024 dimensions (docs/scaling.md).
IVFPQ_FROM_BYTES = 4 << 30


class VectorSearch:
    """Maximum inner product over the index vectors: exact (numpy or faiss flat) or approximate
    (faiss IVF or HNSW with 8-bit scalar-quantised codes, or sharded IVF-PQ, hsl/ann.py), whose
    candidates are re-scored exactly from the float32 vectors on disk."""

    def __init__(self, path: Path, backend: str = "auto", nprobe: int = NPROBE, ef_search: int = EF_SEARCH,
                 ivfpq: IVFPQOptions | None = None) -> None:
        if backend not in BACKENDS:
            raise HSLUsageError(f"`backend` must be one of {', '.join(BACKENDS)}, not {backend!r}", "backend", backend,
                                BACKENDS)
        if backend == "milvus":
            raise HSLUsageError("the milvus backend is hsl.milvus.MilvusSearch (Searcher picks it), not VectorSearch")
        self.path = path
        self._h5 = h5py.File(path, "r")
        self.rows = cache_rows(self._h5)  # [N] store row of each position; -1: dropped by an update
        self._vectors = UsedRows(self._h5["vectors"], len(self.rows))  # builds read blocks through h5py
        self._candidates = candidate_rows(self._h5["vectors"], len(self.rows), path)  # a query's few rows
        self.generation = int(self._h5.attrs.get("generation", 0))
        self.live = None if (self.rows >= 0).all() else self.rows >= 0  # None: every position is a product
        n, dims = self._vectors.shape
        if backend == "auto":
            backend = ("exact" if n * dims * 4 <= EXACT_LIMIT_BYTES
                       else "ivf" if n * dims <= IVFPQ_FROM_BYTES else "ivfpq")
        self.backend = backend
        self.ann = self._ivfpq(replace(ivfpq or IVFPQOptions(), nprobe=nprobe)) if backend == "ivfpq" else None
        self.matrix = self._vectors[:] if backend == "exact" else None  # [N,D] float32
        self.faiss_index = None if backend in ("exact", "ivfpq") else self._faiss_index(backend, nprobe, ef_search)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def exact(self) -> bool:
        return self.backend in ("exact", "flat")

    def _ivfpq(self, opts: IVFPQOptions) -> ShardedIVFPQ:
        opts = opts.resolved(*self._vectors.shape)
        files = [self._ann_file(f"{opts.tag()}.{i}") for i in range(opts.shards)]
        if not all(file.is_file() for file in files):
            build(self._vectors, opts, files)
        return ShardedIVFPQ(self._vectors, files, opts.nprobe, opts.rerank)

    def _faiss_index(self, backend: str, nprobe: int, ef_search: int) -> object:
        import faiss

        file = self._ann_file(backend)
        if not file.is_file():
            previous = self._ann_file(backend, self.generation - 1)
            if backend == "ivf" and previous.is_file() and "touched" in self._h5:
                index = self._updated_ivf(faiss.read_index(str(previous)))  # work in proportion to the change
            else:
                index = build_faiss_index(self._vectors, backend, self.live)
            write_index(index, file)
            for stale in self.path.parent.glob(f"{self.path.stem}.g*.{backend}.faiss"):
                if stale != file:
                    stale.unlink()
        # IVF lists are memory-mapped: a query touches only the lists it probes
        index = faiss.read_index(str(file), faiss.IO_FLAG_MMAP if backend == "ivf" else 0)
        if backend == "ivf":
            index.nprobe = nprobe
            # One query at a time: split its probed lists over the threads (faiss's default splits a batch's
            # queries, leaving one thread idle). At 1M products: 4.1 ms instead of 5.2 ms a search.
            index.parallel_mode = 1
        elif backend == "hnsw":
            index.hnsw.efSearch = ef_search
        return index

    def _ann_file(self, kind: str, generation: int | None = None) -> Path:
        """The ANN file of `kind` made from the vectors of one generation of the cache."""
        generation = self.generation if generation is None else generation
        return self.path.with_name(f"{self.path.stem}.g{generation}.{kind}.faiss")

    def _updated_ivf(self, index: object) -> object:
        """The previous generation's IVF index with the positions the cache update touched re-added."""
        import faiss

        touched = self._h5["touched"][:]
        index.remove_ids(faiss.IDSelectorBatch(touched))
        touched = touched[self.rows[touched] >= 0]
        if len(touched):
            index.add_with_ids(read_rows(self._vectors, touched), touched)
        return index

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(positions into self.rows, inner products) of the k best, best first; `allowed` [N] bool filters."""
        if self.live is not None and self.backend != "ivf":  # dropped positions are never results (IVF: not in it)
            allowed = self.live if allowed is None else allowed & self.live
        k = min(k, len(self.rows) if allowed is None else int(allowed.sum()))
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if self.ann is not None:
            return self.ann.search(query, k, allowed)
        if self.matrix is not None:
            scores = _matvec(self.matrix, query)  # [N]
            if allowed is not None:
                scores = np.where(allowed, scores, -np.inf)
            top = top_k(scores, k)  # best first; equal scores in store order
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
        exact = read_rows(self._candidates, found) @ query  # float32 vectors from disk: the scores are exact again
        return (found, exact) if self.exact else best_exact(found, exact, k)

    def close(self) -> None:
        if self.ann is not None:
            self.ann.close()
        if isinstance(self._candidates, RowReader):
            self._candidates.close()
        self._h5.close()


def _matvec(matrix: np.ndarray, query: np.ndarray) -> np.ndarray:
    """matrix @ query. Where torch is loaded (hsl serve, or an index built in this process), torch does
    it: mixing OpenBLAS's and torch's thread pools in one query makes them spin against each other
    (measured: p50 16 ms instead of 8 ms at 10k products). A cold `hsl query` never loads torch, and
    takes ann.matvec, which keeps OpenBLAS on one thread."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return (torch.from_numpy(matrix) @ torch.from_numpy(query)).numpy()
    return matvec(matrix, query)


def build_faiss_index(vectors: UsedRows, backend: str, live: np.ndarray | None = None) -> object:
    """faiss index over the stored vectors, added block by block (never all float32 vectors at once).
    IVF holds only the `live` positions (ids = positions), so it needs no filter for dropped ones."""
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
        block = vectors[start:start + 65536]
        if backend != "ivf":
            index.add(block)
            continue
        ids = np.arange(start, start + len(block), dtype=np.int64)
        keep = slice(None) if live is None else live[start:start + len(block)]
        index.add_with_ids(block[keep], ids[keep])
    return index
