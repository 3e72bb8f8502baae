"""The HDF5 feature store: one file, readable with plain h5py (layout: data/STORE.md).

Crash safety comes from the layout, not from luck. Every string (ids, paths, titles, attributes)
and every dataset is written when the file is *built*, into a temporary file that atomically
replaces the old one. Numeric datasets are contiguous and allocated at build time, so extraction
afterwards only overwrites bytes in place: no HDF5 metadata changes while features are written.
A row counts only once its `status` byte says DONE, and that byte is written after its features
and a flush. A SIGKILL at any moment thus leaves either the old file or a valid file whose
unfinished rows are still PENDING.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .atomic import temporary_sibling
from .errors import HSLError, StoreInUseError

SCHEMA_VERSION = 2  # 2: regions and title tokens as int8 codes with a float16 scale per vector
READABLE_SCHEMAS = (1, 2)  # schema 1 (float16 everywhere) is read, extended and merged as it is
QUANTIZED = {"regions": "region_scale", "text_tokens": "token_scale"}  # schema 2: codes -> their scales
PENDING, DONE, FAILED = 0, 1, 2
_COPY_BLOCK = 1024  # rows per block when copying features into a rebuilt file
_STRINGS = ("ids", "images", "texts")
FEATURES = ("image_global", "regions", "region_mask", "text_tokens", "text_lengths", "text_sentence")


@dataclass
class RowPlan:
    """Everything about one row that is known before extraction."""

    id: str
    image: str
    text: str
    attributes: dict[str, str] = field(default_factory=dict)
    size: int = -1
    mtime_ns: int = -1
    status: int = PENDING


@dataclass
class RowCopy:
    """Rows whose datasets a new file takes from an open store: `source` row src[i] becomes row dst[i]."""

    source: FeatureStore
    src: np.ndarray
    dst: np.ndarray


def _feature_shapes(meta: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    r, di, dt, t = meta["num_regions"], meta["image_dim"], meta["text_dim"], meta["max_text_tokens"]
    codes = "i1" if schema_of(meta) >= 2 else "f2"
    shapes = {
        "image_global": ((di,), "f2"),
        "regions": ((r, di), codes),
        "region_mask": ((r,), "u1"),
        "text_tokens": ((t, dt), codes),
        "text_lengths": ((), "i4"),
        "text_sentence": ((dt,), "f2"),
        "file_size": ((), "i8"),
        "file_mtime_ns": ((), "i8"),
        "status": ((), "u1"),
    }
    if schema_of(meta) >= 2:
        shapes.update(region_scale=((r,), "f2"), token_scale=((t,), "f2"))
    return shapes


def schema_of(meta: dict) -> int:
    """The layout a store (or a store about to be built from `meta`) has; new stores get the newest."""
    return int(meta.get("schema_version", SCHEMA_VERSION))


def quantize(vectors: np.ndarray, scale_dtype: type = np.float16) -> tuple[np.ndarray, np.ndarray]:
    """[..., D] float -> (int8 codes [..., D], scale [...] in `scale_dtype`): symmetric, one scale per vector,
    so each value is off by at most half a step of its vector's largest |value| / 127 (under 0.4 %). The
    store keeps float16 scales; the shipped model's matrices float32 ones (hsl/model_files.py)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    scale = (np.abs(vectors).max(axis=-1) / 127.0).astype(scale_dtype)  # rounded first: codes use the stored scale
    step = scale.astype(np.float32)[..., None]
    codes = np.divide(vectors, step, out=np.zeros_like(vectors), where=step > 0)
    return np.clip(np.rint(codes), -127, 127).astype(np.int8), scale


def dequantize(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 codes [..., D] and their scales [...] -> float16 [..., D] (what schema 1 stored).

    In torch: the same float32 products, rounded alike, 6x faster than numpy's single thread (a
    training's first 3.6 s on the catalog). Imported here: a cold `hsl query` never loads torch."""
    import torch

    product = torch.from_numpy(np.ascontiguousarray(codes)).float() * torch.from_numpy(scale).float()[..., None]
    return product.half().numpy()


def _preallocated(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: str) -> h5py.Dataset:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # all space now: later writes change no metadata
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # status=PENDING guards rows not yet written
    return group.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl, track_times=False)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FeatureStore:
    """A narrow view of one store file; open with `FeatureStore.open`, build with `FeatureStore.build`."""

    def __init__(self, path: Path, handle: h5py.File) -> None:
        self.path = path
        self._f = handle
        self.meta = _read_meta(path, handle)

    @classmethod
    def open(cls, path: str | os.PathLike, writable: bool = False) -> FeatureStore:
        path = Path(path)
        if not path.is_file():
            raise HSLError(f"{path}: no such store; create it with hsl extract SOURCE and `store` {path}", "store",
                           str(path))
        try:
            # No HDF5 file lock: a query may read while `hsl extract` writes in place, and what it reads is
            # consistent by construction (a row counts once its status says DONE); writers exclude each
            # other with STORE.lock (hsl/store_lock.py), which a killed writer cannot leave behind.
            handle = h5py.File(path, "r+" if writable else "r", locking=False)
        except OSError as exc:
            raise _open_error(path, exc) from None
        return cls(path, handle)

    @staticmethod
    def build(path: str | os.PathLike, meta: dict, rows: Sequence[RowPlan], attribute_columns: list[str],
              copy_from: FeatureStore | None = None, copy_rows: int = 0, copies: Sequence[RowCopy] = ()) -> None:
        """Write a complete new file for `rows`; the first `copy_rows` keep `copy_from`'s features, and
        each of `copies` brings its rows' features along. Every source is closed before the replace."""
        path = Path(path)
        copies = list(copies)
        if copy_from is not None:
            copies.insert(0, RowCopy(copy_from, np.arange(copy_rows), np.arange(copy_rows)))
        tmp = temporary_sibling(path)
        kept = "the existing store is unchanged" if path.exists() else "no store was written"
        ensure_space(tmp, _estimated_bytes(meta, rows, attribute_columns), kept)
        try:
            FeatureStore._write_file(tmp, meta, rows, attribute_columns, copies)
            _fsync_path(tmp)
        except (OSError, RuntimeError) as exc:  # the disk filled up meanwhile, quota, ...: the old store stays
            tmp.unlink(missing_ok=True)
            raise HSLError(f"{path}: could not write {tmp.name} ({_short(exc)}); free disk space or pick another "
                           f"`store` ({kept})", "store", str(path)) from None
        for copy in copies:
            copy.source.close()
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one
        _fsync_path(path.parent)

    @staticmethod
    def _write_file(tmp: Path, meta: dict, rows: Sequence[RowPlan], attribute_columns: list[str],
                    copies: Sequence[RowCopy]) -> None:
        n = len(rows)
        f = h5py.File(tmp, "w")
        try:
            f.attrs.update({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in meta.items()})
            f.attrs["schema_version"] = schema_of(meta)
            f.attrs["attribute_columns"] = json.dumps(attribute_columns)
            # Strings change only here (a build): a new id tells the index cache's copy of them (hsl/hit_records.py)
            # that it is stale even when no photo changed, e.g. a title edited in the manifest.
            f.attrs["strings_id"] = secrets.token_hex(8)
            text = h5py.string_dtype()
            for name, values in zip(_STRINGS, ([r.id for r in rows], [r.image for r in rows],
                                               [r.text for r in rows]), strict=True):
                f.create_dataset(name, data=np.array(values, dtype=object), dtype=text)
            group = f.create_group("attributes")
            for column in attribute_columns:
                group.create_dataset(column, data=np.array([r.attributes.get(column, "") for r in rows],
                                                           dtype=object), dtype=text)
            for name, (shape, dtype) in _feature_shapes(meta).items():
                _preallocated(f, name, (n, *shape), dtype)
            for copy in copies:
                _copy_features(copy, f, meta)
            f["status"][:] = np.array([r.status for r in rows], dtype=np.uint8)
            f["file_size"][:] = np.array([r.size for r in rows], dtype=np.int64)
            f["file_mtime_ns"][:] = np.array([r.mtime_ns for r in rows], dtype=np.int64)
            f.close()
        except BaseException:
            _abandon(f)
            raise

    # -- reading ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._f["ids"].shape[0])

    def strings(self, name: str, rows: np.ndarray | None = None) -> list[str]:
        """`ids`, `images` or `texts`: one per row, or for the given sorted rows only."""
        return _pick_strings(self._f[name], rows)

    def attributes(self, rows: np.ndarray | None = None) -> dict[str, list[str]]:
        group = self._f["attributes"]
        return {c: _pick_strings(group[c], rows) for c in self.meta["attribute_columns"]}

    def row_records(self, rows: np.ndarray) -> list[dict]:
        """id, image, text and attributes of each of `rows` (any order): one read per field, not per row."""
        rows = np.asarray(rows, dtype=np.int64)
        fields = {name: self.strings(name, rows) for name in _STRINGS}
        attributes = self.attributes(rows)
        return [{"id": fields["ids"][i], "image": fields["images"][i], "text": fields["texts"][i],
                 "attributes": {c: values[i] for c, values in attributes.items()}} for i in range(len(rows))]

    def row_strings(self, row: int) -> dict:
        """id, image, text and attributes of one row (for showing a search hit)."""
        return {"id": self._f["ids"].asstr()[row], "image": self._f["images"].asstr()[row],
                "text": self._f["texts"].asstr()[row],
                "attributes": {c: self._f["attributes"][c].asstr()[row] for c in self.meta["attribute_columns"]}}

    def row_plans(self) -> list[RowPlan]:
        """Every row's strings, file stamp and status: what a rebuild or a merge carries over."""
        attrs = self.attributes()
        status, size, mtime = self.column("status"), self.column("file_size"), self.column("file_mtime_ns")
        return [RowPlan(rid, image, text, {c: v[i] for c, v in attrs.items()}, int(size[i]), int(mtime[i]),
                        int(status[i]))
                for i, (rid, image, text) in enumerate(zip(self.strings("ids"), self.strings("images"),
                                                           self.strings("texts"), strict=True))]

    def column(self, name: str) -> np.ndarray:
        """A whole numeric dataset (status, file_size, ...) as numpy."""
        return self._f[name][:]

    def read_features(self, rows: np.ndarray, names: Sequence[str] = FEATURES) -> dict[str, np.ndarray]:
        """Feature arrays (float16 vectors, whatever the schema stores) for the given sorted row indices."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return {name: self._raw(name, 0, 0) for name in names}
        # Contiguous reads, then pick (h5py's per-row fancy indexing is slow), one per group of nearby
        # rows: scattered rows (search candidates, a training sample) never read the store's whole span.
        groups = _nearby_groups(rows)
        out = {}
        for name in names:
            parts = [self._raw(name, int(rows[a]), int(rows[b - 1]) + 1)[rows[a:b] - rows[a]] for a, b in groups]
            out[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out

    def read_block(self, start: int, stop: int, names: Sequence[str] = FEATURES) -> dict[str, np.ndarray]:
        """Rows start..stop-1 of the named features, as read_features gives them: the way to walk a
        store larger than memory (`blocks`), one contiguous read per dataset."""
        return {name: self._raw(name, start, stop) for name in names}

    def blocks(self, rows: np.ndarray, names: Sequence[str] = FEATURES,
               block: int = 4096) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """(rows of the block, their features) over sorted `rows`, `block` rows at a time: memory stays
        at one block whatever the store's size."""
        rows = np.asarray(rows, dtype=np.int64)
        for start in range(0, len(rows), block):
            part = rows[start:start + block]
            yield part, self.read_features(part, names)

    def _raw(self, name: str, start: int, stop: int) -> np.ndarray:
        if name in QUANTIZED and self.schema >= 2:
            return dequantize(self._f[name][start:stop], self._f[QUANTIZED[name]][start:stop])
        return self._f[name][start:stop]

    @property
    def schema(self) -> int:
        return schema_of(self.meta)

    # -- writing in place ---------------------------------------------------------------------------
    def write_features(self, rows: np.ndarray, features: dict[str, np.ndarray]) -> None:
        """Overwrite the feature datasets at `rows` (sorted) with float vectors (quantized here where
        the schema stores codes); callers set status afterwards."""
        for name, values in _encoded(features, self.schema).items():
            _write_rows(self._f[name], rows, values)

    def set_column(self, name: str, rows: np.ndarray, values: np.ndarray | int) -> None:
        _write_rows(self._f[name], rows, np.broadcast_to(np.asarray(values), (len(rows),)))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self) -> dict:
        status = self.column("status")
        return {
            "path": str(self.path),
            "count": int((status == DONE).sum()),
            "rows": len(self),
            "pending": int((status == PENDING).sum()),
            "failed": int((status == FAILED).sum()),
            "backbone": self.meta["backbone"],
            "image_dim": self.meta["image_dim"],
            "text_dim": self.meta["text_dim"],
            "num_regions": self.meta["num_regions"],
            "max_text_tokens": self.meta["max_text_tokens"],
            "attribute_columns": self.meta["attribute_columns"],
            "schema_version": self.meta["schema_version"],
            "precision": self.meta.get("precision", "fp32"),  # stores from before it was recorded: float32
            "hsl_version": self.meta.get("hsl_version", ""),
            "file_bytes": self.path.stat().st_size,
        }


def _nearby_groups(rows: np.ndarray, slack: int = 64) -> list[tuple[int, int]]:
    """[a, b) slices of sorted `rows` whose span is at most 4x their count + `slack` rows: a read of the
    span costs at most about 4x the rows it returns."""
    groups, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] - rows[start] + 1 > 4 * (i - start + 1) + slack:
            groups.append((start, i))
            start = i
    return groups


def _encoded(features: dict[str, np.ndarray], schema: int) -> dict[str, np.ndarray]:
    """Features as the datasets of `schema` hold them: vectors -> int8 codes + scales in schema 2."""
    if schema < 2:
        return features
    out = dict(features)
    for name, scale_name in QUANTIZED.items():
        if name in out:
            out[name], out[scale_name] = quantize(out[name])
    return out


def _copy_features(copy: RowCopy, f: h5py.File, meta: dict) -> None:
    """A copy's rows into the new file: bytes as they are when the layouts agree, else decoded and
    encoded again (a schema 1 store that a run extends becomes schema 2)."""
    source = copy.source
    same = source.schema == schema_of(meta)
    names = list(_feature_shapes(meta)) if same else [*FEATURES, "file_size", "file_mtime_ns", "status"]
    for src, dst, count in _runs(copy.src, copy.dst):
        if same:
            for name in names:
                f[name][dst:dst + count] = source._f[name][src:src + count]
            continue
        block = {**source.read_block(src, src + count),
                 **{name: source._f[name][src:src + count] for name in ("file_size", "file_mtime_ns", "status")}}
        for name, values in _encoded(block, schema_of(meta)).items():
            f[name][dst:dst + count] = values


def _runs(src: np.ndarray, dst: np.ndarray) -> list[tuple[int, int, int]]:
    """(src start, dst start, count) blocks where both row lists run on by one: slice copies, not per row."""
    src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    breaks = (np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1).tolist()
    blocks = []
    for start, stop in zip([0, *breaks], [*breaks, len(src)], strict=True):
        for first in range(start, stop, _COPY_BLOCK):
            blocks.append((int(src[first]), int(dst[first]), min(_COPY_BLOCK, stop - first)))
    return blocks


def _estimated_bytes(meta: dict, rows: Sequence[RowPlan], attribute_columns: list[str]) -> int:
    """An upper bound of the file's size: feature bytes, strings with HDF5's per-string overhead, slack."""
    per_row = sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                  for shape, dtype in _feature_shapes(meta).values())
    strings = sum(len(r.id.encode()) + len(r.image.encode()) + len(r.text.encode())
                  + sum(len(r.attributes.get(c, "").encode()) for c in attribute_columns) for r in rows)
    return len(rows) * per_row + 2 * strings + 32 * len(rows) * (3 + len(attribute_columns)) + (1 << 20)


def ensure_space(tmp: Path, size: int, kept: str) -> None:
    """Reserve the bytes first (fallocate): a full disk is refused before HDF5 writes anything, because
    an HDF5 file whose writes fail cannot be closed cleanly (its library crashes at exit)."""
    probe = tmp.with_name(tmp.name + ".space")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    except OSError as exc:
        raise HSLError(f"{tmp.parent}: not enough room for the store ({size / 1e6:,.1f} MB needed: "
                       f"{exc.strerror}); free disk space or pick another `store` ({kept})", "store") from None
    finally:
        probe.unlink(missing_ok=True)


def _short(exc: BaseException) -> str:
    """HDF5 errors span several lines; keep the operating system's own words."""
    text = str(exc)
    marker = "error message = '"
    if marker in text:
        return text.split(marker, 1)[1].split("'", 1)[0]
    return " ".join(text.split())[:200]


_ABANDONED: list[h5py.File] = []


def _abandon(f: h5py.File) -> None:
    """Forget a file whose writes failed (disk full). Closing it makes HDF5 flush again, fail again
    and crash the process; the temporary file is deleted by the caller and never read."""
    _ABANDONED.append(f)


def _pick_strings(ds: h5py.Dataset, rows: np.ndarray | None) -> list[str]:
    """All strings, or those of `rows` in the order given ("" for a row of -1: a dropped index position).
    Raw bytes decoded here: h5py's asstr() made reading a search's 10 hits 3x slower (25 ms vs 9 ms)."""
    if rows is None:
        return [_text(v) for v in ds[:]]
    rows = np.asarray(rows, dtype=np.int64)
    wanted, back = np.unique(rows[rows >= 0], return_inverse=True)  # h5py reads increasing rows only
    if len(wanted) > ds.shape[0] // 10:  # most rows: one read, then pick (h5py point selection is slow)
        found = ds[:][wanted]
    elif len(wanted) > 64 and wanted[-1] - wanted[0] < 4 * len(wanted):  # a dense run: one slice, then pick
        found = ds[wanted[0]:wanted[-1] + 1][wanted - wanted[0]]
    else:
        found = ds[wanted] if len(wanted) else []
    out = [""] * len(rows)
    for i, value in zip(np.flatnonzero(rows >= 0).tolist(), np.asarray(found, dtype=object)[back].tolist(),
                        strict=True):
        out[i] = _text(value)
    return out


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _write_rows(ds: h5py.Dataset, rows: np.ndarray, values: np.ndarray) -> None:
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1:  # one run of rows: a single slice write
        ds[rows[0]:rows[-1] + 1] = values
    else:
        for row, value in zip(rows.tolist(), values, strict=True):
            ds[row] = value


_REQUIRED = ("ids", "images", "texts", "status", "image_global", "regions", "region_mask", "text_tokens",
             "text_lengths", "text_sentence", "file_size", "file_mtime_ns")


def _open_error(path: Path, exc: OSError) -> HSLError:
    """What an OSError from h5py means for the user: only a file that is really broken is called damaged."""
    text = str(exc)
    if exc.errno == errno.EACCES or "Permission denied" in text:
        return HSLError(f"{path}: permission denied; give this user read (and, to extract, write) access to it")
    if exc.errno == errno.EAGAIN or "unable to lock file" in text:  # an HDF5 lock taken by a program outside hsl
        return StoreInUseError(path, None)
    if "file signature not found" in text:
        return HSLError(f"{path}: not an HDF5 file (no HDF5 signature), so not an hsl store, or one damaged "
                        "from its first bytes; give another `store`", "store", str(path))
    return _damaged(path, _short(exc))


def _damaged(path: Path, why: str) -> HSLError:
    aside = path.with_name(path.name + ".damaged")
    return HSLError(f"{path}: the store is damaged ({why}); move it aside (e.g. to {aside}) and run hsl extract "
                    "again to rebuild it from the photos")


def _read_meta(path: Path, handle: h5py.File) -> dict:
    try:
        attrs = dict(handle.attrs)
        required = _REQUIRED + (tuple(QUANTIZED.values()) if int(attrs.get("schema_version", 1)) >= 2 else ())
        present = [name for name in required if name in handle and handle[name].shape is not None]
    except (KeyError, OSError, ValueError, RuntimeError) as exc:  # h5py's words for a damaged file
        handle.close()
        raise _damaged(path, _short(exc)) from None
    version = attrs.get("schema_version")
    if version is None or "ids" not in present:
        handle.close()
        raise HSLError(f"{path}: an HDF5 file but not an hsl store (no schema_version); give another `store`",
                       "store", str(path))
    if int(version) not in READABLE_SCHEMAS:
        handle.close()
        raise HSLError(f"{path}: written by a newer version of hsl (store schema {version}; this hsl reads "
                       f"{', '.join(map(str, READABLE_SCHEMAS))}); upgrade hsl (pip install -U hsl-retrieval), "
                       "or extract into a new `store`", "store", str(path))
    if len(present) != len(required):
        handle.close()
        missing = sorted(set(required) - set(present))
        raise _damaged(path, f"no {', '.join(missing)}")
    meta = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str) and value.startswith(("[", "{")):  # JSON lists and dicts; "" stays a string
            value = json.loads(value)
        elif isinstance(value, np.generic):
            value = value.item()
        meta[key] = value
    return meta
