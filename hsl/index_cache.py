"""The image side of HSL, computed once per (store, model) and kept beside the store, updated in
place when the store changes.

With AGG = mean, HSL ranking is one maximum-inner-product search over one vector per product
(docs/design.md): the cache `STORE.h5.index/<model>.h5` holds those vectors, the store row of
each (`rows`, -1 for a product the store no longer has ready) and a copy of the store's per-row
stamps (status, file size, mtime) as they were when the vectors were made. The next query or
`hsl index` compares the stamps: a changed or new row is encoded again and written in place (or
appended), a row that is no longer DONE is dropped, so the work is proportional to the change.
The store is read in blocks throughout, so memory does not grow with the catalog.

Crash safety: a full build writes `PATH.tmp` and renames it (a reader keeps the old file); an
update happens only while no process has the cache open (HDF5's lock says so; else it is a full
build), first marks the file `updating`, and a cache left so by a kill is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from . import hit_records
from .atomic import temporary_sibling
from .store import DONE, FeatureStore, ensure_space

if TYPE_CHECKING:
    from .model import HSLModel

INDEX_VERSION = 3  # 3: stamps for incremental updates, room to append, generations for the ANN files
_BLOCK = 512  # products per forward pass of the image side
UPDATE_LIMIT = 0.25  # more changed rows than this share of the index: a full build is simpler and as fast
DEAD_LIMIT = 0.10  # more dropped rows than this share: rebuild, so searches do not carry dead vectors
Progress = Callable[[int, int], None] | None


def store_stamps(store: FeatureStore) -> np.ndarray:
    """[S,3] int64 (status, file size, mtime) per store row: a row whose stamp changed needs a new vector."""
    return np.stack([store.column("status").astype(np.int64), store.column("file_size"),
                     store.column("file_mtime_ns")], axis=1)


def store_fingerprint(stamps: np.ndarray, strings_id: str = "") -> str:
    """Of `store_stamps` and the store's strings: changes whenever a row is added, re-extracted or
    finished, or the store is rebuilt with other strings (hsl/hit_records.py)."""
    digest = hashlib.sha256(np.ascontiguousarray(stamps).tobytes())
    digest.update(str(len(stamps)).encode())
    if strings_id:  # stores from before it have none: their caches stay current
        digest.update(f"/{strings_id}".encode())
    return digest.hexdigest()[:16]


def strings_id(store: FeatureStore) -> str:
    """Which build of the store's strings this is ("" for stores from before it was recorded)."""
    return str(store.meta.get("strings_id", ""))


def index_path(store_path: str | os.PathLike, model_key: str) -> Path:
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + ".index") / f"{model_key}.h5"


def is_current(path: Path, fingerprint: str, precision: str = "fp32") -> bool:
    """Whether the cache holds the vectors of this store state, made in `precision` (older caches: fp32)."""
    try:
        with h5py.File(path, "r") as f:
            return (_usable(f, precision) and f.attrs.get("store_fingerprint") == fingerprint)
    except OSError:  # missing or damaged: rebuilt, never trusted
        return False


def _usable(f: h5py.File, precision: str) -> bool:
    """A cache this version can update: same layout and precision, not left half-updated by a kill."""
    return (f.attrs.get("version") == INDEX_VERSION and f.attrs.get("precision", "fp32") == precision
            and not f.attrs.get("updating", False))


def refresh_index(store_path: str | os.PathLike, model: Callable[[], HSLModel], model_key: str, precision: str,
                  progress: Progress = None, store: FeatureStore | None = None) -> Path:
    """Bring the cache up to date: nothing if current, an update of the changed rows if it can be, else a
    full build. `model` is called only when there is something to encode (it may load torch); `store`,
    the store already open (a query then opens it once), else it is opened here."""
    path = index_path(store_path, model_key)
    if store is None:
        with FeatureStore.open(store_path) as opened:
            return refresh_index(store_path, model, model_key, precision, progress, opened)
    stamps = store_stamps(store)
    fingerprint = store_fingerprint(stamps, strings_id(store))
    if is_current(path, fingerprint, precision):
        return path
    plan = _update_plan(path, stamps, precision)
    if plan is not None:
        try:
            _update(path, store_path, model(), plan, fingerprint, stamps, progress)
            return path
        except _InUse:  # a reader (hsl serve, another query) has the cache open: it keeps its file
            pass
    return build_index(store_path, model(), model_key, progress)


def build_index(store_path: str | os.PathLike, model: HSLModel, model_key: str, progress: Progress = None) -> Path:
    """Encode every extracted product's image side (in the model's precision) and write a new cache."""
    with FeatureStore.open(store_path) as store:
        stamps = store_stamps(store)
        fingerprint = store_fingerprint(stamps, strings_id(store))
        rows = np.flatnonzero(stamps[:, 0] == DONE)
        path = index_path(store_path, model_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(path)
        dims = _dims(model)
        capacity = len(rows) + max(1024, len(rows) // 8)  # room for the products later updates append
        ensure_space(tmp, capacity * (dims * 4 + 8 + 12) + len(rows) * 400 + len(stamps) * 24 + (1 << 20),
                     "queries keep using the old index, if any")
        with h5py.File(tmp, "w") as f:
            # Contiguous, not chunked: reading a query's 200 candidate rows takes 1.7 ms instead of 14-70 ms
            # (HDF5 reads whole chunks); so the room for appended products is allocated now.
            vectors = f.create_dataset("vectors", (capacity, dims), "f4")
            f.create_dataset("rows", data=np.concatenate([rows, np.full(capacity - len(rows), -1)]).astype(np.int64))
            f.create_dataset("stamps", data=stamps, maxshape=(None, 3), chunks=(65536, 3))
            for start, block in _encoded_blocks(store, model, rows, progress):
                vectors[start:start + len(block)] = block
            hit_records.create(f, capacity)
            hit_records.write(f, store, rows, np.arange(len(rows)))
            f.attrs.update({"strings_id": strings_id(store), "version": INDEX_VERSION,
                            "store_fingerprint": fingerprint, "model": model_key,
                            "exact": bool(model.exact_by_inner_product), "precision": model.precision.name,
                            "generation": 0, "count": len(rows)})
    for stale in path.parent.glob(f"{model_key}.*.faiss"):  # ANN files of the previous vectors
        stale.unlink()
    os.replace(tmp, path)
    return path


class _Plan:
    """What an update does: rows to encode (overwritten in place or appended) and positions to drop."""

    def __init__(self, encode: np.ndarray, positions: np.ndarray, drop: np.ndarray) -> None:
        self.encode = encode  # [k] sorted store rows needing a (new) vector
        self.positions = positions  # [k] index position of each: existing, or appended past the end
        self.drop = drop  # [m] index positions whose row is no longer DONE


def _update_plan(path: Path, stamps: np.ndarray, precision: str) -> _Plan | None:
    """The rows to redo, or None when only a full build will do (no usable cache, or a large change)."""
    try:
        with h5py.File(path, "r") as f:
            if not _usable(f, precision) or "stamps" not in f:
                return None
            old, rows, capacity = f["stamps"][:], cache_rows(f), f["rows"].shape[0]
    except OSError:
        return None
    if len(old) > len(stamps):  # the store lost rows: not something extraction does; start again
        return None
    changed = np.flatnonzero(np.any(stamps[:len(old)] != old, axis=1))
    changed = np.concatenate([changed, np.arange(len(old), len(stamps))])
    live = rows >= 0
    if len(changed) > UPDATE_LIMIT * max(1, int(live.sum())):
        return None
    position_of = np.full(len(stamps), -1, np.int64)
    position_of[rows[live]] = np.flatnonzero(live)
    done = stamps[changed, 0] == DONE
    encode, drop = changed[done], position_of[changed[~done]]
    drop = drop[drop >= 0]
    positions = position_of[encode]
    appended = positions < 0
    positions[appended] = len(rows) + np.arange(int(appended.sum()))
    if len(rows) + int(appended.sum()) > capacity:  # no room left for the new products: a full build makes it
        return None
    if (~live).sum() + len(drop) > DEAD_LIMIT * max(1, len(rows) + int(appended.sum())):
        return None
    return _Plan(encode, positions, drop)


class _InUse(Exception):
    """The cache is open elsewhere: changing it in place would change what a reader is reading."""


def _update(path: Path, store_path: str | os.PathLike, model: HSLModel, plan: _Plan, fingerprint: str,
            stamps: np.ndarray, progress: Progress) -> None:
    try:  # HDF5's own lock (on by default) refuses a writer while any process has the file open to read
        f = h5py.File(path, "r+")
    except OSError as exc:
        raise _InUse(str(exc)) from None
    with FeatureStore.open(store_path) as store, f:
        f.attrs["updating"] = True  # a kill from here on leaves a cache that is rebuilt, never trusted
        f.flush()
        vectors, rows = f["vectors"], f["rows"]
        count = max(int(f.attrs["count"]), int(plan.positions.max()) + 1 if len(plan.positions) else 0)
        order = np.argsort(plan.positions)  # appended positions in row order
        for start, block in _encoded_blocks(store, model, plan.encode, progress):
            at = plan.positions[start:start + len(block)]
            _write_at(vectors, at, block)
        if len(order):
            rows[plan.positions[order]] = plan.encode[order]
        if len(plan.drop):
            drop = np.sort(plan.drop)
            rows[drop] = -1
            _write_at(vectors, drop, np.zeros((len(drop), vectors.shape[1]), np.float32))
        _update_records(f, store, plan)
        f["stamps"].resize(len(stamps), axis=0)
        f["stamps"][:] = stamps
        # The positions this update touched, for the ANN files of the previous generation (hsl/index.py).
        touched = np.unique(np.concatenate([plan.positions, plan.drop]).astype(np.int64))
        if "touched" in f:
            del f["touched"]
        f.create_dataset("touched", data=touched)
        f.attrs.update({"store_fingerprint": fingerprint, "generation": int(f.attrs["generation"]) + 1,
                        "count": count, "updating": False})


def _update_records(f: h5py.File, store: FeatureStore, plan: _Plan) -> None:
    """The changed products' records; all of them when the store was rebuilt with other strings (a title or
    attribute edited: the photos, and so the vectors, may not have changed; that rebuild rewrote the
    whole store, so rewriting every record is work in proportion to it), or once for a cache made
    before the records existed."""
    if not hit_records.has_records(f) or f.attrs.get("strings_id", "") != strings_id(store):
        rows = cache_rows(f)
        live = np.flatnonzero(rows >= 0)
        order = np.argsort(rows[live])
        hit_records.replace_all(f, store, rows[live][order], live[order])
        f.attrs["strings_id"] = strings_id(store)
        return
    hit_records.write(f, store, plan.encode, plan.positions)
    hit_records.drop(f, plan.drop)


def cache_rows(f: h5py.File) -> np.ndarray:
    """[count] store row of each used index position (-1: dropped); the rest of the file is room to grow."""
    return f["rows"][:int(f.attrs["count"])]


class UsedRows:
    """The used prefix of the `vectors` dataset, with the dataset's reading interface (shape, [...])."""

    def __init__(self, vectors: h5py.Dataset, count: int) -> None:
        self.vectors, self.shape, self.dtype = vectors, (count, vectors.shape[1]), vectors.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: object) -> np.ndarray:
        if isinstance(key, slice):  # a slice never reaches past the used rows
            key = slice(*key.indices(self.shape[0]))
        return self.vectors[key]


class RowReader:
    """A few rows of a contiguous, uncompressed `vectors` dataset (as build_index writes it), one `pread`
    each: a query's 200 candidates in ~0.5 ms instead of ~3 ms through h5py's point selection. Not a
    memory map: the kernel maps the cached pages around each touched row too, and at 1M products a
    few hundred queries made the process's RSS show 3.3 GB of a 4 GB file."""

    def __init__(self, vectors: h5py.Dataset, count: int, path: Path) -> None:
        self.shape, self.dtype = (count, vectors.shape[1]), vectors.dtype
        self._offset, self._row = vectors.id.get_offset(), vectors.shape[1] * vectors.dtype.itemsize
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty((len(positions), self.shape[1]), self.dtype)
        for i, position in enumerate(np.asarray(positions, np.int64).tolist()):
            out[i] = np.frombuffer(os.pread(self._fd, self._row, self._offset + position * self._row), self.dtype)
        return out

    def close(self) -> None:
        os.close(self._fd)


def candidate_rows(vectors: h5py.Dataset, count: int, path: Path) -> RowReader | UsedRows:
    """Where a query reads its candidates' rows: RowReader when the dataset allows it, else the dataset."""
    if count and vectors.chunks is None and vectors.compression is None and vectors.id.get_offset() is not None:
        return RowReader(vectors, count, path)
    return UsedRows(vectors, count)


def _write_at(dataset: h5py.Dataset, positions: np.ndarray, values: np.ndarray) -> None:
    """dataset[positions] = values, in ascending order (h5py wants it) and in runs where positions follow on."""
    order = np.argsort(positions)
    positions, values = positions[order], values[order]
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    for run in np.split(np.arange(len(positions)), breaks):
        if len(run):
            dataset[positions[run[0]]:positions[run[-1]] + 1] = values[run]


def _dims(model: HSLModel) -> int:
    from .model import index_dim

    return index_dim(model.config)


def _encoded_blocks(store: FeatureStore, model: HSLModel, rows: np.ndarray, progress: Progress):
    """(offset into rows, [b, D] float32 index vectors) for sorted store `rows`, a block at a time."""
    import torch

    from .dataset import image_inputs

    model.eval()
    device = next(model.parameters()).device
    done = 0
    with torch.no_grad():
        for part, features in store.blocks(rows, ("image_global", "regions", "region_mask"), block=_BLOCK):
            regions, mask = image_inputs(features, store.meta, model.config.region_grid)
            image = model.encode_image(regions.to(device).float(), mask.to(device))
            yield done, model.index_vectors(image).cpu().numpy()
            done += len(part)
            if progress:
                progress(done, len(rows))
