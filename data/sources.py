"""List the products of a source: a folder of photos, or a CSV/JSONL manifest.

Reading a source never touches pixels: it yields ids, image paths, titles and attributes, and
reports rows that cannot become products (duplicate id, empty title, bad row) instead of
dropping them. A manifest that lacks a needed column is a usage error, raised at once.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hsl.errors import HSLError, HSLUsageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif"}


@dataclass(frozen=True)
class SourceItem:
    id: str
    image: str  # absolute path
    text: str
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejected:
    """One source row that is reported and skipped; `where` names the file and row."""

    id: str
    image: str
    reason: str
    detail: str
    where: str


@dataclass
class SourceListing:
    items: list[SourceItem]
    rejected: list[Rejected]
    attribute_columns: list[str]


@dataclass(frozen=True)
class Columns:
    id: str = "id"
    image: str = "image"
    text: str = "text"
    image_template: str | None = None  # e.g. "images/{id}.jpg" when there is no image column


MAX_ATTRIBUTE_COLUMNS = 1000  # each becomes an HDF5 dataset; a 10^5-column sheet is a mistake, not a catalog


def read_source(path: str | os.PathLike, columns: Columns = Columns(), allow_outside: bool = False) -> SourceListing:
    """A folder (recursive photos, optional sibling .txt titles) or a .csv/.jsonl manifest.

    A manifest's image paths must stay inside the manifest's folder unless `allow_outside`: a
    shared manifest must not make hsl read (and show in an HTML page) any file of the machine.
    """
    path = Path(path)
    if path.is_dir():
        return _dedupe(_folder_rows(path), [], require_text=False)
    if not path.is_file():
        raise HSLUsageError(f"{path}: no such folder or manifest file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _manifest(path, _csv_rows(path), columns, allow_outside)
    if suffix in (".jsonl", ".ndjson"):
        return _manifest(path, _jsonl_rows(path), columns, allow_outside)
    raise HSLUsageError(f"{path}: unknown source type; give a folder of photos, a .csv or a .jsonl manifest")


def _photo_files(root: Path) -> list[Path]:
    """Photos below `root`, sorted, following linked sub-folders (photos kept on another disk) once each:
    pathlib's rglob would skip them without a word, and a link loop must not recurse forever."""
    seen: set[str] = set()
    found: list[Path] = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        found += [Path(folder) / n for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(p for p in found if p.is_file())


def _folder_rows(root: Path) -> Iterator[tuple[str, SourceItem]]:
    for image in _photo_files(root):
        rel = image.relative_to(root)
        title = image.with_suffix(".txt")
        text = title.read_text(encoding="utf-8", errors="replace") if title.is_file() else ""
        text = text.replace("\x00", "").strip()
        yield str(rel), SourceItem(id=rel.with_suffix("").as_posix(), image=str(image.resolve()), text=text)


def _csv_rows(path: Path) -> Iterator[tuple[int, dict | None, str]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: a leading BOM is not a column
        reader = csv.DictReader(handle)
        try:
            header = reader.fieldnames or []
            yield 0, {"__header__": header}, ""
            for row in reader:
                if None in row:  # more fields than the header: quoting went wrong on this row
                    yield reader.line_num, None, f"{len(row[None]) + len(header)} fields, header has {len(header)}"
                elif None in row.values():  # fewer fields than the header
                    count = sum(v is not None for v in row.values())
                    yield reader.line_num, None, f"{count} fields, header has {len(header)}"
                else:
                    yield reader.line_num, row, ""
        except UnicodeDecodeError as exc:
            raise HSLError(f"{path}: not UTF-8 near byte {exc.start}; save the manifest as UTF-8") from exc
        except csv.Error as exc:
            raise HSLError(f"{path}, line {reader.line_num}: {exc}; check the quoting of that row") from exc


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict | None, str]]:
    header: list[str] | None = None
    with open(path, encoding="utf-8-sig") as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield number, None, f"not valid JSON ({exc.msg})"
                    continue
                if not isinstance(row, dict):
                    yield number, None, "not a JSON object"
                    continue
                if header is None:
                    header = list(row)
                    yield 0, {"__header__": header}, ""
                yield number, {k: "" if v is None else str(v) for k, v in row.items()}, ""
        except UnicodeDecodeError as exc:
            raise HSLError(f"{path}: not UTF-8 near byte {exc.start}; save the manifest as UTF-8") from exc
    if header is None:
        raise HSLUsageError(f"{path}: the manifest has no rows")


def _check_header(path: Path, header: list[str]) -> None:
    names = [str(h).strip() for h in header]
    if any(not n for n in names):
        raise HSLUsageError(f"{path}: column {names.index('') + 1} of the header has no name; name every column")
    seen = set()
    for name in names:
        if name in seen:
            raise HSLUsageError(f"{path}: the column name {name!r} appears twice; make column names unique")
        seen.add(name)
    if len(names) > MAX_ATTRIBUTE_COLUMNS + 3:
        raise HSLUsageError(f"{path}: {len(names)} columns, hsl keeps at most {MAX_ATTRIBUTE_COLUMNS} attribute "
                            "columns; remove the columns you do not need")


def _image_path(path: Path, image: str, allow_outside: bool) -> tuple[str, str]:
    """(absolute path, problem): a path that leaves the manifest's folder is a problem unless allowed.

    What this guards against is a manifest naming files elsewhere (`../../`, an absolute path), which
    `hsl serve` would then hand out. The test is on the path as written, so links that the folder's
    owner placed inside it (`images -> /data/photos`, photos kept on another disk) are followed.
    """
    folder = Path(os.path.abspath(path.parent))
    written = Path(os.path.normpath(folder / image)) if image else folder
    resolved = written.resolve()
    if not allow_outside and not written.is_relative_to(folder):
        return str(resolved), f"{image!r} is outside {path.parent}; move it inside or give --allow-outside"
    return str(resolved), ""


def _manifest(path: Path, rows: Iterable[tuple[int, dict | None, str]], columns: Columns,
              allow_outside: bool) -> SourceListing:
    rows = iter(rows)
    try:
        _, first, _ = next(rows)
    except StopIteration:
        raise HSLUsageError(f"{path}: the manifest is empty") from None
    header = first["__header__"] if first else []
    _check_header(path, header)
    needed = [columns.id, columns.text] + ([] if columns.image_template else [columns.image])
    for name, option in zip(needed, ("--id-column", "--text-column", "--image-column"), strict=False):
        if name not in header:
            hint = " or give --image-template" if option == "--image-column" else ""
            raise HSLUsageError(f"{path}: no column {name!r} (columns: {', '.join(header) or 'none'}); "
                                f"rename it with {option}{hint}")
    used = {columns.id, columns.text, columns.image}
    attribute_columns = [c for c in header if c not in used]
    rejected: list[Rejected] = []

    def items() -> Iterator[tuple[str, SourceItem]]:
        for number, row, problem in rows:
            where = f"{path.name}:{number}"
            if row is not None:  # NUL cannot live in an HDF5 string and never means anything in a title
                row = {k: v.replace("\x00", "") for k, v in row.items()}
            if row is None:
                rejected.append(Rejected("", "", "bad_row", problem, where))
                continue
            missing = [c for c in needed if c not in row]
            if missing:
                rejected.append(Rejected(row.get(columns.id, ""), "", "bad_row",
                                         f"no field {missing[0]!r}", where))
                continue
            item_id = row[columns.id].strip()
            if columns.image_template:
                try:
                    image = columns.image_template.format(**{**row, "id": item_id})
                except (KeyError, IndexError, ValueError) as exc:
                    raise HSLUsageError(f"--image-template {columns.image_template!r} does not fit {where} "
                                        f"({type(exc).__name__}: {exc}); use {{id}} or other column names") from None
            else:
                image = row[columns.image].strip()
            image_path, outside = _image_path(path, image, allow_outside)
            if outside:
                rejected.append(Rejected(item_id, image_path, "outside_folder", outside, where))
                continue
            attributes = {c: row.get(c, "") or "" for c in attribute_columns}
            yield where, SourceItem(id=item_id, image=image_path, text=row[columns.text].strip(),
                                    attributes=attributes)

    listing = _dedupe(items(), attribute_columns, require_text=True)
    listing.rejected[:0] = rejected
    return listing


def _dedupe(rows: Iterable[tuple[str, SourceItem]], attribute_columns: list[str],
            require_text: bool) -> SourceListing:
    """Keep the first row of each id; report empty ids, empty titles (manifests) and later duplicates.

    A photo in a folder without a sibling .txt is kept image-only: it can be searched, not trained on.
    """
    items: list[SourceItem] = []
    rejected: list[Rejected] = []
    first_seen: dict[str, str] = {}
    for where, item in rows:
        if not item.id:
            rejected.append(Rejected("", item.image, "empty_id", "the id is empty", where))
        elif item.id in first_seen:
            rejected.append(Rejected(item.id, item.image, "duplicate_id",
                                     f"id already used at {first_seen[item.id]}", where))
        elif require_text and not item.text:
            rejected.append(Rejected(item.id, item.image, "empty_text", "the title is empty", where))
        else:
            first_seen[item.id] = where
            items.append(item)
    return SourceListing(items=items, rejected=rejected, attribute_columns=attribute_columns)
