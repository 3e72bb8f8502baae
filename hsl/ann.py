"""IVF-PQ search for 10M-100M products: compact codes in RAM, exact re-ranking from vectors on disk.

At 100M products the float32 index vectors take 400 GB, so they stay on disk. RAM holds a PCA
rotation (1024 -> 256 dims), the coarse centroids and, per product, `m` bytes of product-quantised
code plus an 8-byte id. A query probes `nprobe` inverted lists with the codes, then reads the
`rerank` best candidates' float vectors from disk and re-scores them exactly, so the returned
scores are exact inner products and only the candidate set is approximate.

Sharding: the quantizers are trained once on a sample of all products, then each of S contiguous
ranges of products is added to its own copy and written to its own file (one per machine or
disk). A query searches every shard (threads here; a fan-out across machines in production),
re-ranks each shard's pool exactly and merges by exact score. Because the shards share the
quantizers, their lists hold exactly the codes the unsharded index would hold.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_atomic
from .options import IVFPQOptions

_ADD_BLOCK = 65536
_TRAIN_MIN, _TRAIN_MAX = 65536, 262144  # quantizer training sample (k-means needs ~39+ points per centroid)


def write_index(index: object, path: Path) -> None:
    """A faiss index to `path`, atomically: a killed build leaves no file a query would trust."""
    import faiss

    write_atomic(path, lambda tmp: faiss.write_index(index, str(tmp)))


def matvec(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """matrix @ vector in blocks of 256 rows. From 512 x 1024 up, OpenBLAS wakes a second thread, which
    on busy shared cores waits for a scheduler slice: measured 7 ms instead of 0.06 ms per query."""
    blocks = [matrix[i:i + 256] @ vector for i in range(0, len(matrix), 256)]
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


def read_rows(vectors: Any, positions: np.ndarray) -> np.ndarray:
    """float32 rows `positions` of on-disk vectors (h5py dataset or memmap), read in ascending order
    (h5py requires it; disks prefer it) and returned in the order asked."""
    order = np.argsort(positions)
    out = np.empty((len(positions), vectors.shape[1]), np.float32)
    if len(positions):
        out[order] = vectors[positions[order]]
    return out


def best_exact(found: np.ndarray, exact: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k candidates with the highest exact scores, ties broken by position (as the exact search does)."""
    order = np.lexsort((found, -exact))[:k]
    return found[order], exact[order]


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of about equal size."""
    edges = [n * i // shards for i in range(shards + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def train(vectors: Any, opts: IVFPQOptions, seed: int = 0) -> Any:
    """PCA + IVF-PQ quantizers trained on a seeded sample of `vectors` ([N,D], read by rows); empty."""
    import faiss

    n, dims = vectors.shape
    size = min(n, max(_TRAIN_MIN, min(_TRAIN_MAX, 64 * opts.nlist)))
    sample = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    x = np.ascontiguousarray(vectors[sample], dtype=np.float32)  # [size,D]
    # k-means wants ~39 points per centroid: 8-bit codes (256 centroids) need 9,984; a tiny store gets fewer bits.
    nbits = max(1, min(8, int(math.log2(size / 39)) if size >= 78 else 1))
    ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(opts.dim), opts.dim, opts.nlist, opts.m, nbits,
                           faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = ivf.pq.cp.seed = seed
    # 10 k-means rounds on <= 64 points per centroid instead of faiss's 25 on 256: codes only pick the
    # candidates that are then re-scored exactly, and PQ training took minutes on 2 cores (64 k-means).
    ivf.cp.niter = ivf.pq.cp.niter = 10
    ivf.pq.cp.max_points_per_centroid = 64
    if opts.dim == dims:
        index = ivf
    else:
        # The random rotation after PCA spreads the variance evenly over the PQ sub-quantizers.
        index = faiss.IndexPreTransform(faiss.PCAMatrix(dims, opts.dim, 0, True), ivf)
    index.train(x)
    return index


def build(vectors: Any, opts: IVFPQOptions, paths: Sequence[Path], seed: int = 0,
          progress: Callable[[int, int], None] | None = None) -> None:
    """Train once, then add each shard's range of products to its own copy and write it to its file."""
    write_shards(train(vectors, opts, seed), vectors, opts, paths, progress)


def write_shards(trained: Any, vectors: Any, opts: IVFPQOptions, paths: Sequence[Path],
                 progress: Callable[[int, int], None] | None = None) -> None:
    """Add shard i's range of `vectors` to a copy of the trained (empty) index and write it to paths[i]."""
    import faiss

    n = vectors.shape[0]
    done = 0
    for path, (start, stop) in zip(paths, shard_bounds(n, opts.shards), strict=True):
        index = faiss.clone_index(trained)
        for lo in range(start, stop, _ADD_BLOCK):
            hi = min(lo + _ADD_BLOCK, stop)
            # ids are global positions: a shard's hits need no offset when shards are merged
            index.add_with_ids(np.ascontiguousarray(vectors[lo:hi], dtype=np.float32), np.arange(lo, hi))
            done += hi - lo
            if progress:
                progress(done, n)
        write_index(index, path)
        del index


class ShardedIVFPQ:
    """Searches S IVF-PQ shard files and re-ranks their candidates exactly from `vectors` ([N,D] rows
    on disk: an h5py dataset or a numpy memmap, float32 or float16)."""

    def __init__(self, vectors: Any, paths: Sequence[Path], nprobe: int = IVFPQOptions.nprobe,
                 rerank: int = IVFPQOptions.rerank,
                 mmap: bool = True, threads: int | None = None) -> None:
        import faiss

        self.vectors = vectors
        self.nprobe, self.rerank = nprobe, rerank
        flag = faiss.IO_FLAG_MMAP if mmap else 0  # mmap: the OS pages in only the lists a query probes
        self._indexes = [faiss.read_index(str(path), flag) for path in paths]  # owners: keep them alive
        self.shards = [self._split(index) for index in self._indexes]
        # Shards in parallel threads, at most one per core (faiss releases the GIL); threads=1 searches
        # them one after the other. On 2 busy cores both gave the same p50 at 10M (docs/scaling.md).
        workers = min(len(paths), threads or os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(workers) if workers > 1 else None

    @staticmethod
    def _split(index: Any) -> tuple[np.ndarray | None, Any]:
        """(PCA matrix A [d,D] or None, the IVF-PQ). Queries get A q without PCA's centering: that only
        shifts every product's score by the same <A q, A mean>, so the ranking is unchanged."""
        import faiss

        index = faiss.downcast_index(index)
        if isinstance(index, faiss.IndexPreTransform):
            pca = faiss.downcast_VectorTransform(index.chain.at(0))
            matrix = faiss.vector_to_array(pca.A).reshape(pca.d_out, pca.d_in).astype(np.float32)
            return matrix, faiss.downcast_index(index.index)
        return None, index

    def __len__(self) -> int:
        return sum(ivf.ntotal for _, ivf in self.shards)

    def memory_bytes(self) -> int:
        """Bytes the shards hold in RAM when loaded without mmap: codes + ids + centroids + PCA."""
        total = 0
        for matrix, ivf in self.shards:
            total += ivf.ntotal * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4
            total += 0 if matrix is None else matrix.nbytes
        return total

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(positions, exact inner products) of the k best over all shards, best first; ties in position order."""
        query = np.ascontiguousarray(query, dtype=np.float32)
        selector = None
        if allowed is not None:
            import faiss

            selector = faiss.IDSelectorBatch(np.flatnonzero(allowed).astype(np.int64))
        work = [(shard, query, k, selector) for shard in self.shards]
        parts = list(self._pool.map(self._search_shard, work) if self._pool else map(self._search_shard, work))
        found = np.concatenate([p for p, _ in parts])
        scores = np.concatenate([s for _, s in parts])
        return best_exact(found, scores, k)

    def _search_shard(self, job: tuple) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        (matrix, ivf), query, k, selector = job
        q = query if matrix is None else matvec(matrix, query)  # [d]
        params = faiss.SearchParametersIVF(nprobe=min(self.nprobe, ivf.nlist), sel=selector)
        _, found = ivf.search(q[None], max(k, self.rerank), params=params)
        found = found[0][found[0] >= 0]
        exact = matvec(read_rows(self.vectors, found), query)  # float vectors from disk: exact scores again
        return best_exact(found, exact, k)

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown()
