"""What every extraction source shares: options, report, the plan that compares a source with the
store, the store's atomic sync, and the batch commit (features, flush, then status DONE).

A source (hsl/photo_extract.py: photo folders and manifests; hsl/kdd_extract.py: KDD Cup TSV) lists
its items, plans them against the store with `sync_store`, and commits each batch with `commit_batch`,
so resume and crash safety are the same for all of them.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hsl_data.sources import Rejected, SourceItem

from .backbones import Backbone
from .errors import StoreMismatchError
from .options import ExtractOptions
from .precision import Precision, resolve_precision
from .store import DONE, PENDING, FeatureStore, RowPlan

ProgressFn = Callable[[int, int], None]
Fingerprint = Callable[[SourceItem], tuple[int, int] | None]  # (size, stamp) of an item; None: it is gone


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


def file_fingerprint(item: SourceItem) -> tuple[int, int] | None:
    try:
        st = os.stat(item.image)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def plan_rows(listing_items: Sequence[SourceItem], store: FeatureStore | None,
          fingerprint: Fingerprint = file_fingerprint) -> tuple[list[RowPlan], bool, list[Rejected]]:
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


def check_backbone(store: FeatureStore, options: ExtractOptions) -> None:
    meta = {**store.meta, "precision": store_precision(store.meta)}
    wanted = {"backbone": options.backbone, "grid": options.grid, "max_text_tokens": options.max_text_tokens,
              "precision": None if options.precision == "auto" else options.precision}
    for key, value in wanted.items():
        if value is not None and value != meta[key]:
            raise StoreMismatchError(
                f"{store.path} holds {key} {meta[key]!r}, this run asks for {value!r}; "
                f"extract into another `store`, or leave out `{key}` to keep extending this one", key, value)


def store_precision(meta: dict) -> str:
    """The precision a store's features were extracted in (stores from before it was recorded: fp32)."""
    return str(meta.get("precision", "fp32"))


def extraction_precision(known: dict | None, requested: str, device: torch.device) -> Precision:
    """An existing store keeps its precision, so that all its rows come from the same computation."""
    if known is not None and requested == "auto":
        requested = store_precision(known)
    return resolve_precision(requested, device)


def sync_store(store_path: Path, store: FeatureStore | None, meta: dict, items: Sequence[SourceItem],
               new_columns: list[str], fingerprint: Fingerprint = file_fingerprint,
               ) -> tuple[list[RowPlan], list[int], list[Rejected]]:
    """Make the store file hold a row for every item: (rows, row indices still to extract, items gone).

    Rebuilds the file atomically when rows or strings change, else resets changed rows in place;
    `store` (the open old file, if any) is closed either way. Shared by every source format.
    """
    rows, rebuild, missing = plan_rows(items, store, fingerprint)
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
