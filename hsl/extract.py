"""Extraction: source reader -> photo decoding in worker processes -> backbone -> store writer.

Resumable by construction: a plan compares the source with the store (new ids, changed files or
titles), the store file is rebuilt atomically when its rows change, and then each batch's
features are written and flushed before the batch's rows are marked DONE.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hsl_data.kdd import is_kdd_tsv
from hsl_data.sources import Columns, Rejected, SourceItem, read_source

from . import __version__
from .backbones import DEFAULT_BACKBONE, Backbone, create_backbone
from .distributed import Rank, from_env
from .errors import HSLUsageError, StoreMismatchError
from .images import DEFAULT_MAX_PIXELS, BadItem, load_image
from .precision import Precision, resolve_precision
from .processes import die_with_parent
from .store import DONE, FAILED, PENDING, FeatureStore, RowPlan
from .store_lock import writing

ProgressFn = Callable[[int, int], None]
Fingerprint = Callable[[SourceItem], tuple[int, int] | None]  # (size, stamp) of an item; None: it is gone


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


@dataclass
class ExtractReport:
    store: str
    source_items: int
    already_done: int
    extracted: int
    skipped: list[Rejected]
    seconds: float
    processes: int = 1  # torchrun processes that shared the work

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped).most_common())

    def write_errors(self, path: str | os.PathLike) -> None:
        """One JSON line per skipped item: id, image, reason, detail, where."""
        with open(path, "w", encoding="utf-8") as handle:
            for item in self.skipped:
                handle.write(json.dumps(asdict(item), ensure_ascii=False) + "\n")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise HSLUsageError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise HSLUsageError(f"device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise HSLUsageError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s) "
                            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); pick one of them")
    if resolved.type not in ("cpu", "cuda"):  # mps, xla, ...: the library only places tensors on cpu or cuda
        raise HSLUsageError(f"unknown device {device!r}; use auto, cpu or cuda[:N]")
    return resolved


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


def _file_fingerprint(item: SourceItem) -> tuple[int, int] | None:
    try:
        st = os.stat(item.image)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _plan(listing_items: Sequence[SourceItem], store: FeatureStore | None,
          fingerprint: Fingerprint = _file_fingerprint) -> tuple[list[RowPlan], bool, list[Rejected]]:
    """Rows of the next store (old rows first, in order) and whether the file must be rebuilt."""
    missing: list[Rejected] = []
    old_index: dict[str, int] = {}
    rows: list[RowPlan] = []
    if store is not None:
        rows = store.row_plans()
        old_index = {row.id: i for i, row in enumerate(rows)}
    rebuild = store is None
    for item in listing_items:
        stamp = fingerprint(item)
        if stamp is None:
            missing.append(Rejected(item.id, item.image, "missing_file", "no such file", item.image))
            continue
        plan = RowPlan(item.id, item.image, item.text, dict(item.attributes), *stamp)
        i = old_index.get(item.id)
        if i is None:
            rows.append(plan)
            rebuild = True
            continue
        old = rows[i]
        if (old.image, old.text, old.attributes) != (plan.image, plan.text, plan.attributes):
            rebuild = True  # strings live in the file's structure: only a rebuild may change them
        elif (old.size, old.mtime_ns) == (plan.size, plan.mtime_ns):
            plan.status = old.status
        rows[i] = plan
    return rows, rebuild, missing


def _check_backbone(store: FeatureStore, options: ExtractOptions) -> None:
    meta = {**store.meta, "precision": store_precision(store.meta)}
    wanted = {"backbone": options.backbone, "grid": options.grid, "max_text_tokens": options.max_text_tokens,
              "precision": None if options.precision == "auto" else options.precision}
    for key, value in wanted.items():
        if value is not None and value != meta[key]:
            raise StoreMismatchError(
                f"{store.path} holds {key} {meta[key]!r}, this run asks for {value!r}; "
                f"extract into another --store, or drop the option to keep extending this one")


def store_precision(meta: dict) -> str:
    """The precision a store's features were extracted in (stores from before it was recorded: fp32)."""
    return str(meta.get("precision", "fp32"))


def extraction_precision(known: dict | None, requested: str, device: torch.device) -> Precision:
    """An existing store keeps its precision, so that all its rows come from the same computation."""
    if known is not None and requested == "auto":
        requested = store_precision(known)
    return resolve_precision(requested, device)


def extract(source: str | os.PathLike, store_path: str | os.PathLike, options: ExtractOptions | None = None,
            progress: ProgressFn | None = None, me: Rank | None = None) -> ExtractReport:
    """Extract every product of `source` that the store lacks (or that changed) into `store_path`.

    Under torchrun (`me`, by default from the environment, has world > 1) every process extracts a share
    into its own shard store and rank 0 merges them (hsl/shards.py); every rank returns the job's report.
    """
    options = options or ExtractOptions()
    me = from_env() if me is None else me
    if is_kdd_tsv(source):  # KDD Cup 2020 detector boxes: no photos, no image backbone
        if me.distributed:
            raise HSLUsageError("a KDD Cup TSV is extracted by one process (it is read as a stream, without a "
                                "backbone for images); run hsl extract without torchrun")
        from .kdd_extract import extract_kdd

        with writing(store_path, "hsl extract"):
            return extract_kdd(source, store_path, options, progress)
    if options.batch_size < 1 or options.workers < 0:
        raise HSLUsageError("--batch-size must be at least 1 and --workers at least 0")
    if me.distributed:
        from .shards import extract_sharded

        return extract_sharded(source, Path(store_path), options, me, progress)
    started = time.perf_counter()
    store_path = Path(store_path)
    with writing(store_path, "hsl extract"):  # a second writer is refused here, before it reads anything
        store = FeatureStore.open(store_path) if store_path.exists() else None
        if store is not None:
            _check_backbone(store, options)  # before any work: no model loaded, nothing written
        listing = read_source(source, options.columns, allow_outside=options.allow_outside)
        items = listing.items[: options.limit] if options.limit is not None else listing.items
        report = extract_items(items, store_path, store, options, listing.attribute_columns, progress)
    report.skipped[:0] = listing.rejected
    report.seconds = time.perf_counter() - started
    return report


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


def sync_store(store_path: Path, store: FeatureStore | None, meta: dict, items: Sequence[SourceItem],
               new_columns: list[str], fingerprint: Fingerprint = _file_fingerprint,
               ) -> tuple[list[RowPlan], list[int], list[Rejected]]:
    """Make the store file hold a row for every item: (rows, row indices still to extract, items gone).

    Rebuilds the file atomically when rows or strings change, else resets changed rows in place;
    `store` (the open old file, if any) is closed either way. Shared by every source format.
    """
    rows, rebuild, missing = _plan(items, store, fingerprint)
    attribute_columns = list(store.meta["attribute_columns"]) if store else []
    attribute_columns += [c for c in new_columns if c not in attribute_columns]
    if rebuild:
        old_rows = len(store) if store else 0
        FeatureStore.build(store_path, meta, rows, attribute_columns, copy_from=store, copy_rows=old_rows)
    elif store is not None:
        store.close()
    wanted = {item.id for item in items} - {m.id for m in missing}
    todo = [i for i, r in enumerate(rows) if r.id in wanted and r.status != DONE]
    if not rebuild and todo:  # changed files keep their row: reset status and stats in place
        with FeatureStore.open(store_path, writable=True) as writable:
            todo_arr = np.array(todo, dtype=np.int64)
            writable.set_column("status", todo_arr, PENDING)
            writable.set_column("file_size", todo_arr, np.array([rows[i].size for i in todo], dtype=np.int64))
            writable.set_column("file_mtime_ns", todo_arr,
                                np.array([rows[i].mtime_ns for i in todo], dtype=np.int64))
            writable.flush()
    return rows, todo, missing


def commit_batch(store: FeatureStore, rows: np.ndarray, features: dict[str, np.ndarray]) -> None:
    """Write a batch's features, flush, and only then mark its rows DONE (a kill never leaves junk DONE)."""
    store.write_features(rows, features)
    store.flush()
    store.set_column("status", rows, DONE)


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


def text_features(backbone: Backbone, texts: list[str]) -> dict[str, np.ndarray]:
    """The store's text datasets for a batch of titles; an empty title stays zero with length 0."""
    n = len(texts)
    tokens = np.zeros((n, backbone.max_text_tokens, backbone.text_dim), np.float16)
    lengths = np.zeros(n, np.int32)
    sentence = np.zeros((n, backbone.text_dim), np.float16)
    with_text = [i for i, t in enumerate(texts) if t]
    if with_text:  # photos without a title stay image-only: zero tokens, length 0
        text = backbone.encode_texts([texts[i] for i in with_text])
        tokens[with_text] = text.tokens.cpu().numpy()
        lengths[with_text] = text.lengths.cpu().numpy()
        sentence[with_text] = text.sentence.cpu().numpy()
    return {"text_tokens": tokens, "text_lengths": lengths, "text_sentence": sentence}
