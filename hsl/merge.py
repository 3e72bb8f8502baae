"""`hsl merge`: join shard stores (one per torchrun process, or any stores of one extraction) into one.

The merged file is built like every store, into `OUT.tmp` and then renamed over `OUT`, so a kill
leaves the old store (or none) and the shards untouched. An existing `OUT` is merged into: its rows
keep their places, a shard row with the same id replaces the old one (the shard is the newer
extraction; only an unfinished copy of a row the store has finished, same photo, title and
attributes, does not), and new ids follow in shard order. Merging the same shards again therefore
gives the same store. Rows a shard has not finished (pending or failed) keep their status, so a
later `hsl extract` into the merged store completes them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import HSLUsageError, StoreMismatchError
from .store import DONE, FeatureStore, RowCopy, RowPlan
from .store_lock import writing

# May differ between stores that merge: the columns are joined, the version is only a note.
# Free to differ: the merged file takes the union of the columns, and is written in the newest schema
# (rows of a schema 1 input are converted to codes as they are copied: hsl/store.py).
_FREE_META = ("attribute_columns", "hsl_version", "schema_version", "strings_id")  # strings_id: per build


@dataclass
class MergeReport:
    store: str
    shards: list[str]
    rows: int
    done: int
    not_done: int  # pending or failed: a later `hsl extract` into the store retries them
    replaced: int  # rows of the existing store that a shard row replaced
    seconds: float


def meta_difference(meta: dict, other: dict) -> tuple[str, object, object] | None:
    """The first backbone, preprocessing, size or schema value two stores disagree on: (key, mine, other's)."""
    for key in sorted((set(meta) | set(other)) - set(_FREE_META)):
        if meta.get(key) != other.get(key):
            return key, meta.get(key), other.get(key)
    return None


def merge(shards: Sequence[str | os.PathLike], store_path: str | os.PathLike,
          only: Sequence[Collection[str]] | None = None) -> MergeReport:
    """Join `shards` into `store_path` (merging into it when it exists); `only[k]`: the ids shard k may give."""
    started = time.perf_counter()
    store_path, paths = Path(store_path), [Path(s) for s in shards]
    _check_paths(paths, store_path)
    with ExitStack() as stack:
        stack.enter_context(writing(store_path, "hsl merge"))
        opened = [stack.enter_context(FeatureStore.open(path)) for path in paths]
        base = stack.enter_context(FeatureStore.open(store_path)) if store_path.exists() else None
        reference = base or opened[0]
        for shard in opened:
            differ = meta_difference(shard.meta, reference.meta)
            if differ is not None:
                key, mine, theirs = differ
                raise StoreMismatchError(f"{shard.path} has {key} {mine!r}, {reference.path} has {theirs!r}; "
                                         "merge only stores extracted with the same backbone and options")
        rows, copies, replaced = _join(base, opened, only)
        sources = ([base] if base else []) + opened
        columns = list(dict.fromkeys(c for store in sources for c in store.meta["attribute_columns"]))
        meta = {k: v for k, v in reference.meta.items() if k not in ("schema_version", "attribute_columns")}
        FeatureStore.build(store_path, meta, rows, columns, copies=copies)
    done = sum(row.status == DONE for row in rows)
    return MergeReport(store=str(store_path), shards=[str(p) for p in paths], rows=len(rows), done=done,
                       not_done=len(rows) - done, replaced=replaced, seconds=time.perf_counter() - started)


def _check_paths(paths: list[Path], store_path: Path) -> None:
    if not paths:
        raise HSLUsageError("give at least one shard store to merge")
    seen: dict[Path, Path] = {}
    for path in paths:
        key = path.resolve()
        if key == store_path.resolve():
            raise HSLUsageError(f"{path} is the `store` itself: an existing store is merged into already; "
                                "leave it out of the shards", "shards", str(path))
        if key in seen:
            raise HSLUsageError(f"{path} is given twice (also as {seen[key]})")
        seen[key] = path


def _join(base: FeatureStore | None, shards: list[FeatureStore], only: Sequence[Collection[str]] | None,
          ) -> tuple[list[RowPlan], list[RowCopy], int]:
    """The merged rows, where each finished row's features come from, and how many base rows were replaced."""
    rows = base.row_plans() if base else []
    index = {row.id: i for i, row in enumerate(rows)}
    came_from: dict[str, Path] = {}
    replaced: set[int] = set()
    copies: list[RowCopy] = []
    for k, shard in enumerate(shards):
        src, dst = [], []
        for i, row in enumerate(shard.row_plans()):
            if only is not None and row.id not in only[k]:
                continue  # left over from an earlier share of this rank: another shard owns it now
            if row.id in came_from:
                raise StoreMismatchError(f"id {row.id!r} is in both {came_from[row.id]} and {shard.path}; "
                                         "shards must hold disjoint products")
            came_from[row.id] = shard.path
            out = index.get(row.id)
            if out is None:
                out = index[row.id] = len(rows)
                rows.append(row)
            elif rows[out].status == DONE and row.status != DONE and replace(row, status=DONE) == rows[out]:
                continue  # the store already finished this very version (a shard merged again after an extract)
            else:
                rows[out] = row
                replaced.add(out)
            if row.status == DONE:  # other rows' bytes are never read: status guards them
                src.append(i)
                dst.append(out)
        copies.append(RowCopy(shard, np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64)))
    if base is not None:
        kept = base.column("status") == DONE
        kept[sorted(replaced)] = False
        copies.insert(0, RowCopy(base, np.flatnonzero(kept), np.flatnonzero(kept)))
    return rows, copies, len(replaced)
