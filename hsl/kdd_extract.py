"""`hsl extract FILE.tsv`: a KDD Cup 2020 file into a feature store, without any image backbone.

The detector boxes are the regions (the k largest, padded to k with region_mask 0), the whole-image
vector is the mean of the kept boxes, and only the queries go through a text backbone. Two
streaming passes keep a 100 GB train file out of memory: the first lists the rows (ids, queries,
attributes and a digest of each line) and plans the store with the photo path's own
`sync_store` (same atomic rebuild and resume guarantees; the line's length and digest play the
photo's size and mtime, so a changed row is re-extracted); the second decodes only the rows still
to extract and commits them batch by batch (features, flush, then status DONE).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from hsl_data.kdd import DEFAULT_MAX_BOXES, KddRow, read_kdd
from hsl_data.sources import Rejected, SourceItem

from . import __version__
from .backbones import BOXES_PREFIX, Backbone, create_text_encoder
from .devices import resolve_device
from .distributed import Rank
from .errors import HSLError, HSLUsageError, StoreMismatchError
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
from .precision import Precision
from .store import FAILED, FeatureStore

ATTRIBUTES = ["product_id", "query_id", "class_labels"]
DEFAULT_TEXT = "minilm"


def text_spec(backbone: str | None) -> str:
    """The text side of the `backbone` parameter: minilm (default), tiny or openclip:...; a box store's full
    name works too."""
    spec = (backbone or DEFAULT_TEXT).removeprefix(BOXES_PREFIX)
    spec = DEFAULT_TEXT if spec == "minilm-effnet" else spec
    if spec not in (DEFAULT_TEXT, "tiny") and not spec.startswith("openclip:"):
        raise HSLUsageError(f"`backbone` {backbone!r} cannot encode KDD Cup queries; use minilm, tiny or "
                            "openclip:ARCH/TAG (the boxes come with their own features)", "backbone", backbone,
                            [DEFAULT_TEXT, "tiny", "openclip:ARCH/TAG"])
    return spec


class KddSource:
    """A KDD Cup 2020 TSV: detector boxes, no photos, no image backbone; read by one process, as a stream."""

    shardable = False

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path

    def check(self, options: ExtractOptions, me: Rank) -> None:
        if me.distributed:
            raise HSLUsageError("a KDD Cup TSV is extracted by one process (it is read as a stream, without a "
                                "backbone for images); run hsl extract without torchrun")
        if options.batch_size < 1:
            raise HSLUsageError("`batch_size` must be at least 1", "batch_size", options.batch_size)
        if options.grid is not None:
            raise HSLUsageError("`grid` pools a photo's feature map; a KDD Cup file has detector boxes, "
                                "use `max_boxes`", "grid", options.grid)

    def extract(self, store_path: Path, options: ExtractOptions, progress: ProgressFn | None) -> ExtractReport:
        """One process brings `store_path` up to date; the caller holds the store's writer lock."""
        return extract_kdd(self.path, store_path, options, progress)


def extract_kdd(source: str | os.PathLike, store_path: str | os.PathLike, options: ExtractOptions,
                progress: ProgressFn | None = None) -> ExtractReport:
    """Extract every row of a KDD Cup 2020 TSV that the store lacks (or that changed) into `store_path`
    (options already checked by `KddSource.check`)."""
    started = time.perf_counter()
    source, store_path = Path(source), Path(store_path)
    store = FeatureStore.open(store_path) if store_path.exists() else None
    spec = text_spec(options.backbone or (store.meta["backbone"] if store else None))
    max_boxes = options.max_boxes or (store.meta["num_regions"] if store else DEFAULT_MAX_BOXES)
    if store is not None:  # before any work: nothing read, nothing written
        if not store.meta["backbone"].startswith(BOXES_PREFIX):
            raise StoreMismatchError(f"{store.path} holds photo features ({store.meta['backbone']}); extract the "
                                     "KDD Cup file into another `store`", "store", os.fspath(store_path))
        check_backbone(store, replace(options, backbone=BOXES_PREFIX + spec))
        if max_boxes != store.meta["num_regions"]:
            raise StoreMismatchError(f"{store.path} keeps {store.meta['num_regions']} boxes per image, this run "
                                     f"asks for {max_boxes}; extract into another `store`, or leave out `max_boxes`",
                                     "max_boxes", max_boxes)
    items, stamps, rejected, dim = _list_rows(source, max_boxes, store.meta["image_dim"] if store else None,
                                              options.limit)
    if not items:
        if store is not None:
            store.close()
        raise HSLError(f"{source}: no usable rows ({len(rejected)} rejected); check the file is a KDD Cup 2020 TSV")
    encoder = None
    precision = extraction_precision(store.meta if store else None, options.precision,
                                     resolve_device(options.device))
    if store is None:
        encoder = _encoder(spec, options, precision)
        meta = {"backbone": BOXES_PREFIX + spec, "image_size": 0, "image_mean": [], "image_std": [],
                "resize": "none: KDD Cup 2020 detector boxes", "grid": 0, "num_regions": max_boxes,
                "image_dim": dim, "text_dim": encoder.text_dim, "max_text_tokens": encoder.max_text_tokens,
                "box_order": "largest area first", "precision": precision.name, "hsl_version": __version__}
    else:
        meta = {k: v for k, v in store.meta.items() if k not in ("schema_version", "attribute_columns")}
    rows, todo, _ = sync_store(store_path, store, meta, items, ATTRIBUTES, lambda item: stamps[item.id])
    failed: list[Rejected] = []
    if todo:  # a no-op re-run never loads the text model nor decodes a box
        encoder = encoder or _encoder(spec, options, precision)
        with FeatureStore.open(store_path, writable=True) as writable:
            failed = _write(source, writable, encoder, {rows[i].id: i for i in todo}, max_boxes, dim, options,
                            progress)
    return ExtractReport(store=str(store_path), source_items=len(items), already_done=len(items) - len(todo),
                         extracted=len(todo) - len(failed), skipped=rejected + failed,
                         seconds=time.perf_counter() - started)


def _encoder(spec: str, options: ExtractOptions, precision: Precision) -> Backbone:
    encoder = create_text_encoder(spec, options.max_text_tokens).to(resolve_device(options.device))
    return encoder.use_precision(precision)


def _list_rows(source: Path, max_boxes: int, dim: int | None, limit: int | None,
               ) -> tuple[list[SourceItem], dict[str, tuple[int, int]], list[Rejected], int]:
    """First pass: the rows to plan (no features kept), their (length, digest), the rejected rows."""
    items: list[SourceItem] = []
    stamps: dict[str, tuple[int, int]] = {}
    first_seen: dict[str, str] = {}
    rejected: list[Rejected] = []
    for row in read_kdd(source, max_boxes, dim):
        if isinstance(row, Rejected):
            rejected.append(row)
            continue
        if row.id in first_seen:
            rejected.append(Rejected(row.id, "", "duplicate_id", f"id already used at {first_seen[row.id]}",
                                     row.where))
            continue
        if limit is not None and len(items) >= limit:
            break
        dim = row.features.shape[1]
        first_seen[row.id] = row.where
        stamps[row.id] = (row.size, row.digest)
        labels = " ".join(map(str, row.class_labels.tolist()))  # one per kept box, in region order
        items.append(SourceItem(id=row.id, image="", text=row.query,
                                attributes={"product_id": row.product_id, "query_id": row.query_id,
                                            "class_labels": labels}))
    return items, stamps, rejected, dim or 0


def _write(source: Path, store: FeatureStore, encoder: Backbone, todo: dict[str, int], max_boxes: int, dim: int,
           options: ExtractOptions, progress: ProgressFn | None) -> list[Rejected]:
    """Second pass: decode the rows still to do and commit them a batch at a time."""
    total, done = len(todo), 0
    failed: list[Rejected] = []
    batch: list[tuple[int, KddRow]] = []

    def commit() -> None:
        nonlocal done
        batch.sort(key=lambda pair: pair[0])  # row order: one slice write when the rows are contiguous
        index = np.array([i for i, _ in batch], dtype=np.int64)
        commit_batch(store, index, _features(encoder, [row for _, row in batch], max_boxes, dim))
        done += len(batch)
        batch.clear()
        if progress:
            progress(done, total)

    if progress:
        progress(0, total)
    for row in read_kdd(source, max_boxes, dim, wanted=todo):
        if isinstance(row, Rejected):  # reported by the first pass; a good row with its id may follow
            continue
        i = todo.pop(row.id, None)  # popped: a later duplicate of the id is not even decoded
        if i is None:
            continue
        batch.append((i, row))
        if len(batch) == options.batch_size:
            commit()
    if batch:
        commit()
    for rid, i in todo.items():  # the file changed since the first pass: the row is gone or now bad
        store.set_column("status", np.array([i]), FAILED)
        failed.append(Rejected(rid, "", "changed_row", "the row changed or left the file during extraction",
                               source.name))
    store.flush()
    return failed


def _features(encoder: Backbone, rows: list[KddRow], max_boxes: int, dim: int) -> dict[str, np.ndarray]:
    n = len(rows)
    regions = np.zeros((n, max_boxes, dim), np.float16)  # [B,k,D], zero past each row's boxes
    mask = np.zeros((n, max_boxes), np.uint8)  # [B,k]
    whole = np.zeros((n, dim), np.float16)  # [B,D]
    for i, row in enumerate(rows):
        regions[i, :len(row.features)] = row.features
        mask[i, :len(row.features)] = 1
        whole[i] = row.features.mean(axis=0)
    # A valid pool repeats its query ~30 times: encode each distinct query once.
    unique = {text: j for j, text in enumerate(dict.fromkeys(row.query for row in rows))}
    text = text_features(encoder, list(unique))
    pick = np.array([unique[row.query] for row in rows])
    return {"image_global": whole, "regions": regions, "region_mask": mask,
            **{name: values[pick] for name, values in text.items()}}
