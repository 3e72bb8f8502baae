"""`hsl extract`: one pipeline, with the kind of source as a plug-in and torchrun sharding around it.

A source (`Source`) checks the options, and then brings a store up to date with what it holds:
`PhotoSource` (photo folders and CSV/JSONL manifests, hsl/photo_extract.py) and `KddSource` (a KDD
Cup 2020 TSV of detector boxes, hsl/kdd_extract.py). What they share, the plan against the store,
its atomic sync and the batch commit, is in hsl/extract_base.py. Under torchrun a shardable source
is split between the processes, each into a shard store that rank 0 merges (hsl/shards.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from hsl_data.kdd import is_kdd_tsv

from .distributed import Rank, from_env
from .extract_base import (  # noqa: F401  (the extraction API, importable from here as before)
    ExtractOptions,
    ExtractReport,
    ProgressFn,
    commit_batch,
    sync_store,
    text_features,
)
from .kdd_extract import KddSource
from .options import default_workers  # noqa: F401  (importable from here as before)
from .photo_extract import PhotoSource, extract_items  # noqa: F401
from .shards import extract_sharded
from .store_lock import writing


class Source(Protocol):
    """One kind of input of `hsl extract`."""

    shardable: bool  # torchrun may split it between processes (hsl/shards.py)

    def check(self, options: ExtractOptions, me: Rank) -> None:
        """Refuse options this source cannot honour, before any work."""

    def extract(self, store_path: Path, options: ExtractOptions, progress: ProgressFn | None) -> ExtractReport:
        """One process brings the store up to date; the caller holds the store's writer lock."""


def open_source(source: str | os.PathLike) -> Source:
    """The plug-in that reads `source`: a KDD Cup TSV, else photos (a folder or a manifest)."""
    return KddSource(source) if is_kdd_tsv(source) else PhotoSource(source)


def extract(source: str | os.PathLike, store_path: str | os.PathLike, options: ExtractOptions | None = None,
            progress: ProgressFn | None = None, me: Rank | None = None) -> ExtractReport:
    """Extract every product of `source` that the store lacks (or that changed) into `store_path`.

    Under torchrun (`me`, by default from the environment, has world > 1) every process extracts a share
    into its own shard store and rank 0 merges them (hsl/shards.py); every rank returns the job's report.
    """
    options = options or ExtractOptions()
    me = from_env() if me is None else me
    reader = open_source(source)
    reader.check(options, me)
    if me.distributed:
        return extract_sharded(reader, Path(store_path), options, me, progress)
    with writing(store_path, "hsl extract"):  # a second writer is refused here, before it reads anything
        return reader.extract(Path(store_path), options, progress)
