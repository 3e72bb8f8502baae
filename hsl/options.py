"""The library's option dataclasses and search defaults, in one light module (no numpy, no torch):
the CLI takes its defaults from here at import time without slowing its help down, and the library
modules that use them (hsl/train.py, hsl/ann.py, hsl/extract_base.py, hsl/search.py) import them."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

from hsl_data.sources import Columns

from .errors import HSLUsageError

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit
TOP_K = 10  # results per query
NPROBE = 32  # ivf / ivfpq: lists visited per query (and shard); see IVFPQOptions
EF_SEARCH = 128  # hnsw: candidate list size per query
# Candidates an approximate ranking gathers for an exact re-score from the float32 vectors (faiss ivf /
# hnsw, Milvus) or with HSLModel.similarities (AGG = max | topk, where the inner product is only a part):
# max(k, RERANK_POOL). One pool for all, so the backends trade the same recall for the same work.
RERANK_POOL = 200
# String defaults shared by the library's search, serve and eval functions and the CLI's options.
DEVICE = "cpu"  # query, index, serve, eval, train: the CPU unless asked (extraction's own is "auto")
PRECISION = "auto"  # hsl/precision.py: the fastest measured on the device
SEARCH_BACKEND = "auto"  # hsl/index.py: exact, then ivf, then ivfpq as the catalog grows
EVAL_BACKEND = "exact"  # hsl eval scores every gallery product unless asked to go through an index
EVAL_SPLIT = "auto"  # the model's test split when it has one, else all
MILVUS_INDEX = "auto"  # hsl/milvus.py: HNSW for a new collection


@dataclass
class TrainOptions:
    config: str = "hsl-default"
    epochs: int | None = None  # None: the config's
    batch_size: int | None = None
    lr: float | None = None
    val_fraction: float | None = None  # None: the config's training.val_fraction (0.1 unless it says)
    test_fraction: float = 0.15  # a fixed, seed-independent hold-out that training never sees
    seed: int = 0
    device: str = DEVICE
    resume: bool = False
    precision: str = "auto"  # of the towers' forward passes; auto: the fastest on the device (hsl/precision.py)
    max_products: int | None = None  # train on a seeded sample of this many training products (None: all)
    memory_budget: int = 2 << 30  # bytes of features held in memory; a larger training set streams from the store
    member_processes: int = 0  # members trained at once, a process each (hsl/members.py); 0: all on the CPU


def default_workers() -> int:
    """One decoding process per spare core: on 2 cores, 1 worker beside the forward pass.

    Under torchrun the node's cores are split between its LOCAL_WORLD_SIZE processes first."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    processes = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, min(4, (os.cpu_count() or 2) // processes - 1))


@dataclass
class ExtractOptions:
    backbone: str | None = None  # None: the store's backbone, or the default for a new store
    grid: int | None = None  # pool the region grid to grid x grid cells
    max_text_tokens: int | None = None
    batch_size: int = 32
    workers: int = field(default_factory=default_workers)
    device: str = "auto"
    precision: str = "auto"  # auto: the store's own, or for a new store the fastest on the device (hsl/precision.py)
    max_pixels: int = DEFAULT_MAX_PIXELS
    columns: Columns = field(default_factory=Columns)
    limit: int | None = None  # only the first N products of the source (demos, smoke tests)
    allow_outside: bool = False  # manifest image paths may leave the manifest's folder
    max_boxes: int | None = None  # KDD Cup TSV: boxes kept per image, largest first (None: the store's, or 20)


@dataclass(frozen=True)
class IVFPQOptions:
    """Knobs of the `ivfpq` backend. Build-time: nlist, m, dim, shards; query-time: nprobe, rerank."""

    nlist: int = 0  # inverted lists per shard; 0 = a power of two near sqrt(products per shard)
    m: int = 64  # PQ sub-quantizers = bytes of code per product (8-bit codes)
    dim: int = 256  # PCA output dimension before PQ; 0 = no PCA
    # Measured (docs/scaling.md): recall@10 stopped growing past nprobe 8 on the synthetic 1M/10M
    # sets; 32 keeps a margin for real catalogues, whose clusters are less clean. Recall is set by
    # the re-rank pool: 0.97 at 200 and 0.987 at 400 over 10M products, for +0.6 ms.
    nprobe: int = NPROBE  # lists visited per query and shard
    rerank: int = 400  # candidates per shard re-scored exactly from the float vectors on disk
    shards: int = 1

    def resolved(self, n: int, dims: int) -> IVFPQOptions:
        """Check every knob against a store of n vectors of `dims`; fill in the automatic ones."""
        for name, value in (("ivfpq.m", self.m), ("nprobe", self.nprobe), ("ivfpq.rerank", self.rerank),
                            ("ivfpq.shards", self.shards)):
            if not isinstance(value, int) or value < 1:
                raise HSLUsageError(f"`{name}` must be a positive integer, not {value!r}", name, value)
        if not isinstance(self.nlist, int) or self.nlist < 0:
            raise HSLUsageError(f"`ivfpq.nlist` must be a positive integer (or 0 for automatic), not {self.nlist!r}",
                                "ivfpq.nlist", self.nlist)
        if not isinstance(self.dim, int) or not 0 <= self.dim <= dims:
            raise HSLUsageError(f"`ivfpq.dim` must be between 1 and the index dimension {dims} (or 0: no PCA), "
                                f"not {self.dim!r}", "ivfpq.dim", self.dim)
        if self.shards > max(n, 1):
            raise HSLUsageError(f"`ivfpq.shards` {self.shards} is more than the {n} products in the index",
                                "ivfpq.shards", self.shards)
        dim = self.dim or dims
        if dim % self.m:
            raise HSLUsageError(f"`ivfpq.m` {self.m} must divide the PCA dimension {dim} (e.g. {_divisor(dim)})",
                                "ivfpq.m", self.m)
        per_shard = max(1, n // self.shards)
        nlist = self.nlist or min(65536, 2 ** round(math.log2(math.sqrt(per_shard))))
        if nlist > per_shard:
            raise HSLUsageError(f"`ivfpq.nlist` {nlist} is more than the {per_shard} products per shard",
                                "ivfpq.nlist", nlist)
        return replace(self, nlist=nlist, dim=dim)

    def tag(self) -> str:
        """Names the build-time knobs in the shard files, so changing one never reuses a stale index."""
        return f"ivfpq-d{self.dim}-m{self.m}-l{self.nlist}-s{self.shards}"


def _divisor(dim: int) -> int:
    return next(m for m in (64, 32, 16, 8, 4, 2, 1) if dim % m == 0)
