"""Read the KDD Cup 2020 Multimodalities Recall data (Taobao) one row at a time.

A TSV file: a header, then 9 tab-separated columns per row,
`product_id, image_h, image_w, num_boxes, boxes, features, class_labels, query, query_id`, where
`boxes`, `features` and `class_labels` are base64 of little-endian float32 [n,4] (top, left,
bottom, right), float32 [n,D] (D = 2048 in the released files) and int64 [n]. A train file holds
one (query, product) pair per row; a valid/test file holds one row per candidate product of each
query's pool. `valid_answer.json` maps each query id to its correct product ids.

The real train file is over 100 GB, so nothing here holds more than one line at a time. A row that
cannot become a product (missing column, bad base64, sizes that disagree) is reported as a
`Rejected` item, never dropped silently and never fatal.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hsl.errors import HSLUsageError

from .sources import Rejected

COLUMNS = ("product_id", "image_h", "image_w", "num_boxes", "boxes", "features", "class_labels", "query",
           "query_id")
HEADER = "\t".join(COLUMNS)
DEFAULT_MAX_BOXES = 20  # the HSL paper keeps the 20 largest detector boxes per image


@dataclass(frozen=True)
class KddRow:
    """One parsed row; the box arrays hold the kept boxes only, largest area first."""

    id: str  # "{query_id}:{product_id}": unique per pair, since a product may appear with several queries
    product_id: str
    query_id: str
    query: str
    image_h: int
    image_w: int
    boxes: np.ndarray  # [k,4] float32 top, left, bottom, right
    features: np.ndarray  # [k,D] float32
    class_labels: np.ndarray  # [k] int64
    num_boxes: int  # boxes in the file, before keeping the k largest
    where: str  # "train.tsv:12"
    size: int  # bytes of the line
    digest: int  # 63-bit BLAKE2b of the line: with `size`, tells a changed row on re-extraction


def row_id(query_id: str, product_id: str) -> str:
    return f"{query_id}:{product_id}"


def is_kdd_tsv(path: str | os.PathLike) -> bool:
    """A .tsv file, or any file whose first line starts like the competition's header."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".tsv":
        return True
    with open(path, "rb") as handle:
        return handle.read(len(HEADER)).decode("utf-8", "replace").startswith("product_id\timage_h")


def read_kdd(path: str | os.PathLike, max_boxes: int = DEFAULT_MAX_BOXES, feature_dim: int | None = None,
             wanted: Container[str] | None = None) -> Iterator[KddRow | Rejected]:
    """Stream the rows of a competition TSV: a `KddRow` per good row, a `Rejected` per bad one.

    `feature_dim` None takes the width of the first good row and holds every later row to it.
    With `wanted`, rows whose id is not in it are skipped before any base64 is decoded (a resumed
    extraction reads the file again but decodes only what it still needs).
    """
    if max_boxes < 1:
        raise HSLUsageError(f"--max-boxes must be at least 1, got {max_boxes}")
    path = Path(path)
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if number == 1 and line.startswith(b"product_id"):
                if line.rstrip(b"\r\n").decode("utf-8", "replace") != HEADER:
                    raise HSLUsageError(f"{path}:1: header {line[:200].decode('utf-8', 'replace').strip()!r} "
                                        f"is not the KDD Cup 2020 header {HEADER!r}")
                continue
            if not line.strip():
                continue
            row = parse_row(line, f"{path.name}:{number}", max_boxes, feature_dim, wanted)
            if row is None:
                continue
            if isinstance(row, KddRow) and feature_dim is None:
                feature_dim = row.features.shape[1]
            yield row


def parse_row(line: bytes, where: str, max_boxes: int, feature_dim: int | None,
              wanted: Container[str] | None = None) -> KddRow | Rejected | None:
    """One TSV line -> KddRow, or Rejected naming what is wrong; None when `wanted` lacks its id."""
    fields = line.rstrip(b"\r\n").split(b"\t")
    if len(fields) != len(COLUMNS):
        return Rejected("", "", "bad_row", f"{len(fields)} columns, the format has {len(COLUMNS)}", where)
    try:
        product_id, query, query_id = (fields[i].decode("utf-8").replace("\x00", "").strip() for i in (0, 7, 8))
    except UnicodeDecodeError as exc:
        return Rejected("", "", "bad_row", f"not UTF-8 near byte {exc.start}", where)
    if not product_id or not query_id:
        return Rejected("", "", "bad_row", "empty product_id or query_id", where)
    rid = row_id(query_id, product_id)
    if wanted is not None and rid not in wanted:
        return None

    def reject(reason: str, detail: str) -> Rejected:
        return Rejected(rid, "", reason, detail, where)

    if not query:
        return reject("empty_text", "the query is empty")
    try:
        image_h, image_w, n = (int(fields[i]) for i in (1, 2, 3))
    except ValueError:
        return reject("bad_number", f"image_h, image_w, num_boxes {b' '.join(fields[1:4])[:60]!r} are not integers")
    if n < 1:
        return reject("no_boxes", f"num_boxes is {n}")
    arrays = {}
    for name, i in (("boxes", 4), ("features", 5), ("class_labels", 6)):
        try:
            arrays[name] = base64.b64decode(fields[i], validate=True)
        except (binascii.Error, ValueError) as exc:
            return reject("bad_base64", f"{name}: {exc}")
    boxes_n, labels_n = len(arrays["boxes"]) / 16, len(arrays["class_labels"]) / 8
    if boxes_n == labels_n and boxes_n.is_integer() and boxes_n != n:
        return reject("num_boxes_mismatch", f"num_boxes {n}, but boxes and class_labels hold {int(boxes_n)}")
    if boxes_n != n or labels_n != n:
        return reject("bad_size", f"boxes hold {len(arrays['boxes'])} bytes and class_labels "
                                  f"{len(arrays['class_labels'])}, num_boxes {n} needs {16 * n} and {8 * n}")
    width = len(arrays["features"]) / (4 * n)
    if not width.is_integer() or width < 1 or (feature_dim is not None and width != feature_dim):
        wanted_width = f"{feature_dim}" if feature_dim is not None else "a whole number of"
        return reject("bad_size", f"features hold {len(arrays['features'])} bytes: {width:g} floats per box, "
                                  f"expected {wanted_width}")
    boxes = np.frombuffer(arrays["boxes"], "<f4").reshape(n, 4)
    features = np.frombuffer(arrays["features"], "<f4").reshape(n, int(width))
    if not (np.isfinite(boxes).all() and np.isfinite(features).all()):
        return reject("non_finite", "boxes or features hold NaN or infinity")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [n]
    keep = np.argsort(-area, kind="stable")[:max_boxes]  # the largest boxes; ties keep file order
    labels = np.frombuffer(arrays["class_labels"], "<i8")
    return KddRow(id=rid, product_id=product_id, query_id=query_id, query=query, image_h=image_h,
                  image_w=image_w, boxes=boxes[keep].astype(np.float32), features=features[keep].astype(np.float32),
                  class_labels=labels[keep].astype(np.int64), num_boxes=n, where=where, size=len(line),
                  digest=int.from_bytes(hashlib.blake2b(line, digest_size=8).digest(), "big") >> 1)


def format_row(product_id: str, image_h: int, image_w: int, boxes: np.ndarray, features: np.ndarray,
               class_labels: np.ndarray, query: str, query_id: str) -> str:
    """One TSV line in the competition's layout (no newline): for synthetic data and tests."""
    def b64(array: np.ndarray, dtype: str) -> str:
        return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")

    return "\t".join([str(product_id), str(image_h), str(image_w), str(len(boxes)), b64(boxes, "<f4"),
                      b64(features, "<f4"), b64(class_labels, "<i8"), query, str(query_id)])


def read_answers(path: str | os.PathLike) -> dict[str, set[str]]:
    """valid_answer.json: {query_id: [product_id, ...]} -> {query_id: {product_id, ...}} (ids as text)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HSLUsageError(f"{path}: cannot read the answer file ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise HSLUsageError(f"{path}: expected a JSON object mapping query ids to lists of product ids")
    answers = {}
    for query_id, products in data.items():
        if not isinstance(products, list):
            raise HSLUsageError(f"{path}: query {query_id!r} maps to {type(products).__name__}, not a list of ids")
        answers[str(query_id)] = {str(p) for p in products}
    return answers
