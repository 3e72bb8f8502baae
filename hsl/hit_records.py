"""Each index position's id, photo, title and attributes, packed beside its vector in the index cache.

Why a copy of the store's strings? A search shows 10 hits, and the store keeps every string field
(ids, texts, images, each attribute column) as its own HDF5 dataset: 11 fields x 10 hits = 110 reads
scattered over a store of 37 GB at a million products, which the page cache cannot hold, about
12 ms of a warm query. Here a hit is one JSON record, read in one slice of `record_blob`; the whole
copy is ~310 bytes a product (measured at 1M) and stays in the page cache. Caches made before it have no records:
their hits are read from the store as before.

Layout (in `STORE.h5.index/<model>.h5`): `record_blob` uint8, extendable; `record_start` int64 and
`record_len` int32 per position (len 0: no record, a dropped position); `vocabulary`, the catalog's
words ("\n"-joined UTF-8), which tells a query in another language (hsl/search.py). An update appends the
changed products' records and repoints their positions; the bytes it leaves behind are dropped by
the next full build (updates redo at most a quarter of the index, hsl/index_cache.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import h5py
import numpy as np

from .store import FeatureStore

_BLOCK = 8192  # products whose strings are read and packed at a time
_WORD = re.compile(r"[^\W\d_]{2,}")  # a word of letters (any script), as shoppers type them
_CHUNK = 1 << 16  # bytes per HDF5 chunk of the blob: a hit's read touches one or two


def create(f: h5py.File, capacity: int) -> None:
    f.create_dataset("record_blob", (0,), np.uint8, maxshape=(None,), chunks=(_CHUNK,))
    f.create_dataset("record_start", (capacity,), np.int64)
    f.create_dataset("record_len", data=np.zeros(capacity, np.int32))


def has_records(f: h5py.File) -> bool:
    return "record_blob" in f


def write(f: h5py.File, store: FeatureStore, rows: np.ndarray, positions: np.ndarray) -> None:
    """Append the records of sorted store `rows` and point index `positions` (one per row) at them."""
    blob, starts, lengths = f["record_blob"], f["record_start"], f["record_len"]
    # A new blob (nothing written yet) gets the whole catalog's words; an update adds to a vocabulary
    # only where one exists: a cache made before it would get a part of the catalog's words.
    keep_words = "vocabulary" in f or blob.shape[0] == 0
    words = _vocabulary(f) if keep_words else set()  # collected, then dropped, where none is kept
    for begin in range(0, len(rows), _BLOCK):
        packed = list(_records(store, rows[begin:begin + _BLOCK], words))
        sizes = np.array([len(p) for p in packed], np.int64)
        offset = blob.shape[0]
        blob.resize(offset + int(sizes.sum()), axis=0)
        blob[offset:] = np.frombuffer(b"".join(packed), np.uint8)
        at = positions[begin:begin + _BLOCK]
        order = np.argsort(at)  # h5py writes at increasing positions
        starts[at[order]] = (offset + np.cumsum(sizes) - sizes)[order]
        lengths[at[order]] = sizes[order].astype(np.int32)
    if keep_words:
        _write_vocabulary(f, words)


def replace_all(f: h5py.File, store: FeatureStore, rows: np.ndarray, positions: np.ndarray) -> None:
    """A new blob for every position (the old one's bytes become free space in the file)."""
    for name in ("record_blob", "record_start", "record_len", "vocabulary"):
        if name in f:
            del f[name]
    create(f, f["rows"].shape[0])
    write(f, store, rows, positions)


def drop(f: h5py.File, positions: np.ndarray) -> None:
    if len(positions):
        f["record_len"][np.sort(positions)] = 0


def _records(store: FeatureStore, rows: np.ndarray, words: set[str]) -> Iterator[bytes]:
    """Each row's record; the words of its title and attributes go into `words`."""
    ids, texts, images = (store.strings(name, rows) for name in ("ids", "texts", "images"))
    attributes = store.attributes(rows)
    words.update(catalog_words(texts))
    for values in attributes.values():
        words.update(catalog_words(set(values)))
    for i in range(len(rows)):
        record = {"id": ids[i], "image": images[i], "text": texts[i],
                  "attributes": {c: values[i] for c, values in attributes.items()}}
        yield json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()


def catalog_words(texts: Iterable[str]) -> set[str]:
    return {word for text in texts for word in _WORD.findall(text.lower())}


def _vocabulary(f: h5py.File) -> set[str]:
    """The words of every title and attribute value the records hold (a superset after updates)."""
    if "vocabulary" not in f:
        return set()
    return set(f["vocabulary"][:].tobytes().decode("utf-8").split("\n")) - {""}


def _write_vocabulary(f: h5py.File, words: set[str]) -> None:
    if "vocabulary" in f:
        del f["vocabulary"]
    f.create_dataset("vocabulary", data=np.frombuffer("\n".join(sorted(words)).encode("utf-8"), np.uint8))


class HitRecords:
    """Read side: the records of a few index positions, from an open cache (None: it has none, or
    they are of another build of the store's strings than `strings_id`)."""

    def __init__(self, path: Path, strings_id: str) -> None:
        self._f = h5py.File(path, "r")
        self.available = has_records(self._f) and self._f.attrs.get("strings_id", "") == strings_id
        if self.available:  # 12 bytes a product, read once: each hit then costs one slice of the blob
            self.starts, self.lengths = self._f["record_start"][:], self._f["record_len"][:]
            self._blob = self._f["record_blob"]

    def get(self, positions: np.ndarray) -> list[dict] | None:
        if not self.available or (self.lengths[positions] == 0).any():
            return None  # a position without a record (the caller reads the store instead)
        return [json.loads(self._blob[s:s + n].tobytes())
                for s, n in zip(self.starts[positions].tolist(), self.lengths[positions].tolist(), strict=True)]

    def vocabulary(self) -> set[str] | None:
        """The catalog's words (titles and attribute values), lower case; None for a cache without them."""
        if not self.available or "vocabulary" not in self._f:
            return None
        if not hasattr(self, "_words"):
            self._words = _vocabulary(self._f)
        return self._words

    def close(self) -> None:
        self._f.close()
