"""Photos from a folder or a CSV/JSONL manifest: source reader -> photo decoding in worker processes ->
backbone -> store writer.

Resumable by construction: a plan compares the source with the store (new ids, changed files or
titles), the store file is rebuilt atomically when its rows change, and then each batch's
features are written and flushed before the batch's rows are marked DONE (hsl/extract_base.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hsl_data.sources import Rejected, SourceItem, SourceListing, read_source

from . import __version__
from .backbones import DEFAULT_BACKBONE, Backbone, create_backbone
from .devices import resolve_device
from .distributed import Rank
from .errors import HSLUsageError
from .extract_base import (
    ExtractOptions,
    ExtractReport,
    ProgressFn,
    check_backbone,
    commit_batch,
    extraction_precision,
    sync_store,
    text_features,
)
from .images import BadItem, load_image
from .processes import die_with_parent
from .store import FAILED, FeatureStore, RowPlan


class PhotoSource:
    """A photo folder (recursive, sibling .txt titles) or a CSV/JSONL manifest; torchrun may shard it."""

    shardable = True

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path

    def check(self, options: ExtractOptions, me: Rank) -> None:
        if options.batch_size < 1 or options.workers < 0:
            raise HSLUsageError("`batch_size` must be at least 1 and `workers` at least 0",
                                "batch_size" if options.batch_size < 1 else "workers")

    def listing(self, options: ExtractOptions) -> SourceListing:
        """The source's items (the first `options.limit` of them), rejected rows and attribute columns."""
        listing = read_source(self.path, options.columns, allow_outside=options.allow_outside)
        if options.limit is not None:
            listing = replace(listing, items=listing.items[: options.limit])
        return listing

    def extract(self, store_path: Path, options: ExtractOptions, progress: ProgressFn | None) -> ExtractReport:
        """One process brings `store_path` up to date; the caller holds the store's writer lock."""
        started = time.perf_counter()
        store = FeatureStore.open(store_path) if store_path.exists() else None
        if store is not None:
            check_backbone(store, options)  # before any work: no model loaded, nothing written
        listing = self.listing(options)
        report = extract_items(listing.items, store_path, store, options, listing.attribute_columns, progress)
        report.skipped[:0] = listing.rejected
        report.seconds = time.perf_counter() - started
        return report

    def extract_items(self, items: Sequence[SourceItem], store_path: Path, store: FeatureStore | None,
                      options: ExtractOptions, attribute_columns: list[str], progress: ProgressFn | None = None,
                      template: dict | None = None) -> ExtractReport:
        """A share of the listing into a store (a torchrun shard): `extract_items` below."""
        return extract_items(items, store_path, store, options, attribute_columns, progress, template)


class _PhotoDataset(Dataset):
    """Decodes one photo per index; bad photos come back as a reason instead of pixels."""

    def __init__(self, rows: list[int], paths: list[str], size: int, max_pixels: int) -> None:
        self.rows, self.paths, self.size, self.max_pixels = rows, paths, size, max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str, str]:
        try:
            return self.rows[i], load_image(self.paths[i], self.size, self.max_pixels), "", ""
        except BadItem as bad:
            return self.rows[i], None, bad.reason, bad.detail


def _collate(batch: list) -> list:
    return batch  # pixels are stacked in the main process, once bad items are set aside


def _worker_init(parent_pid: int, _: int) -> None:
    die_with_parent(parent_pid)  # a kill -9 of `hsl extract` must not leave decoders behind
    torch.set_num_threads(1)  # decoding is the worker's job; the cores belong to the forward pass


def extract_items(items: Sequence[SourceItem], store_path: Path, store: FeatureStore | None,
                  options: ExtractOptions, attribute_columns: list[str], progress: ProgressFn | None = None,
                  template: dict | None = None) -> ExtractReport:
    """Bring `store_path` (open as `store`, or None when absent) up to date with `items`.

    `template` is the meta of the store a new file must match (a shard of an existing store);
    without one a new file takes the backbone's own description.
    """
    started = time.perf_counter()
    known = store.meta if store is not None else template
    spec = options.backbone or (known["backbone"] if known else DEFAULT_BACKBONE)
    grid = options.grid or (known["grid"] if known else None)
    tokens = options.max_text_tokens or (known["max_text_tokens"] if known else None)
    device = resolve_device(options.device)
    precision = extraction_precision(known, options.precision, device)
    backbone = None
    if known is None:
        backbone = create_backbone(spec, grid=grid, max_text_tokens=tokens).to(device).use_precision(precision)
        meta = {**backbone.describe(), "precision": precision.name, "hsl_version": __version__}
    else:
        meta = {k: v for k, v in known.items() if k not in ("schema_version", "attribute_columns")}
    rows, todo, missing = sync_store(store_path, store, meta, items, attribute_columns)
    failed: list[Rejected] = []
    if todo:  # a no-op re-run never loads the model
        backbone = backbone or create_backbone(spec, grid=grid, max_text_tokens=tokens).to(device).use_precision(
            precision)
        batches = _decoded_batches(backbone, rows, todo, options)
        # The decoding workers are forked by now: the store opens after them, so none inherits its handle.
        with FeatureStore.open(store_path, writable=True) as writable:
            failed = _write_batches(batches, backbone, writable, rows, len(todo), progress)
    return ExtractReport(store=str(store_path), source_items=len(items),
                         already_done=len(items) - len(missing) - len(todo), extracted=len(todo) - len(failed),
                         skipped=missing + failed, seconds=time.perf_counter() - started)


def _decoded_batches(backbone: Backbone, rows: list[RowPlan], todo: list[int],
                     options: ExtractOptions) -> Iterator[list]:
    """Batches of decoded photos; with workers, they are started (forked) before this returns."""
    dataset = _PhotoDataset(todo, [rows[i].image for i in todo], backbone.image_size, options.max_pixels)
    loader = DataLoader(dataset, batch_size=options.batch_size, num_workers=options.workers,
                        collate_fn=_collate, worker_init_fn=partial(_worker_init, os.getpid()) if options.workers
                        else None, prefetch_factor=4 if options.workers else None,
                        pin_memory=backbone.device.type == "cuda")
    return iter(loader)


def _write_batches(batches: Iterator[list], backbone: Backbone, store: FeatureStore, rows: list[RowPlan],
                   total: int, progress: ProgressFn | None) -> list[Rejected]:
    skipped: list[Rejected] = []
    done = 0
    if progress:
        progress(0, total)
    for batch in batches:
        good = [(row, pixels) for row, pixels, _, _ in batch if pixels is not None]
        bad = [(row, reason, detail) for row, pixels, reason, detail in batch if pixels is None]
        if good:
            good_rows = np.array([row for row, _ in good], dtype=np.int64)
            features = _encode(backbone, torch.from_numpy(np.stack([p for _, p in good])),
                               [rows[r].text for r in good_rows.tolist()])
            commit_batch(store, good_rows, features)
        if bad:
            store.set_column("status", np.array([b[0] for b in bad], dtype=np.int64), FAILED)
            skipped += [Rejected(rows[r].id, rows[r].image, reason, detail, rows[r].image) for r, reason, detail in bad]
        store.flush()
        done += len(batch)
        if progress:
            progress(done, total)
    return skipped


def _encode(backbone: Backbone, pixels: torch.Tensor, texts: list[str]) -> dict[str, np.ndarray]:
    whole, regions = backbone.encode_images(pixels)  # [B,D], [B,R,D]
    return {
        "image_global": whole.cpu().numpy().astype(np.float16),
        "regions": regions.cpu().numpy().astype(np.float16),
        "region_mask": np.ones(regions.shape[:2], np.uint8),
        **text_features(backbone, texts),
    }
