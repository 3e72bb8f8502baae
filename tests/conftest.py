"""Shared fixtures: synthetic product photos, a bad-photo corpus, the real catalog when present."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
FASHION = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion"

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "black": (20, 20, 20)}
KINDS = ["shirt", "dress", "shoe", "watch"]


def synthetic_photo(seed: int, size: int = 48) -> tuple[Image.Image, str]:
    """A coloured shape on white with a matching title, e.g. 'red shirt 7'."""
    rng = np.random.default_rng(seed)
    colour = list(COLOURS)[seed % len(COLOURS)]
    kind = KINDS[(seed // len(COLOURS)) % len(KINDS)]
    pixels = np.full((size, size, 3), 255, np.uint8)
    lo, hi = sorted(rng.integers(4, size - 4, 2))
    pixels[lo:hi + 4, size // 4: 3 * size // 4] = COLOURS[colour]
    pixels = np.clip(pixels.astype(int) + rng.integers(-10, 10, pixels.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels), f"{colour} {kind} {seed}"


def write_folder(root: Path, n: int, size: int = 48) -> Path:
    """n photos in two sub-folders, each with a sibling .txt title."""
    for i in range(n):
        image, title = synthetic_photo(i, size)
        path = root / f"group{i % 2}" / f"item{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
        path.with_suffix(".txt").write_text(title, encoding="utf-8")
    return root


def big_photos(root: Path, n: int, size: int = 640) -> Path:
    """n large JPEGs (copies of 4 originals) with titles: decoding keeps a run busy for seconds."""
    root.mkdir(parents=True)
    originals = []
    for seed in range(4):
        synthetic_photo(seed, size=size)[0].save(root / "original.jpg", quality=95)
        originals.append((root / "original.jpg").read_bytes())
    (root / "original.jpg").unlink()
    for i in range(n):
        (root / f"p{i:04d}.jpg").write_bytes(originals[i % 4])
        (root / f"p{i:04d}.txt").write_text(f"product number {i}")
    return root


def write_manifest(root: Path, n: int, extra_rows: list[dict] | None = None) -> Path:
    """images/ID.jpg plus products.csv with id, image, text and two attribute columns."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image, title = synthetic_photo(i)
        image.save(root / "images" / f"p{i}.jpg")
        rows.append({"id": f"p{i}", "image": f"images/p{i}.jpg", "text": title,
                     "colour": title.split()[0], "kind": title.split()[1]})
    rows += extra_rows or []
    with open(root / "products.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "image", "text", "colour", "kind"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "products.csv"


def store_features(path: Path) -> dict[str, np.ndarray]:
    """The finished rows' features and ids of a store."""
    from hsl.store import DONE, FeatureStore

    with FeatureStore.open(path) as store:
        rows = np.flatnonzero(store.column("status") == DONE)
        out = store.read_features(rows)
        out["ids"] = np.array(store.strings("ids"))[rows]
    return out


def assert_same_store(a: Path, b: Path) -> None:
    """Same finished ids in the same order, features within float16 noise."""
    got, want = store_features(a), store_features(b)
    np.testing.assert_array_equal(got["ids"], want["ids"])
    for name in ("image_global", "regions", "text_tokens", "text_sentence"):
        np.testing.assert_allclose(got[name], want[name], atol=2e-3)


def synthetic_store(path: Path, n: int, seed: int = 0, prefix: str = "s", backbone: str = "tiny") -> None:
    """A store of n products with random features, without any photos: the tiny backbone's sizes, or
    (backbone="minilm-effnet") the default preset's, named as if that preset had extracted them."""
    from hsl.backbones import create_backbone
    from hsl.store import DONE, FeatureStore, RowPlan

    meta = {**create_backbone("tiny").describe(), "hsl_version": "test"}
    if backbone == "minilm-effnet":
        meta.update(backbone=backbone, image_dim=1280, text_dim=384, max_text_tokens=32)
    rows = [RowPlan(f"{prefix}{i}", f"/nowhere/{prefix}{i}.jpg", f"synthetic product {i}", {"kind": f"k{i % 7}"},
                    1, 1) for i in range(n)]
    FeatureStore.build(path, meta, rows, ["kind"])
    rng = np.random.default_rng(seed)
    d, r, t, dt = meta["image_dim"], meta["num_regions"], meta["max_text_tokens"], meta["text_dim"]
    with FeatureStore.open(path, writable=True) as store:
        index = np.arange(n)
        store.write_features(index, {
            "image_global": rng.standard_normal((n, d)).astype(np.float16),
            "regions": rng.standard_normal((n, r, d)).astype(np.float16),
            "region_mask": np.ones((n, r), np.uint8),
            "text_tokens": rng.standard_normal((n, t, dt)).astype(np.float16),
            "text_lengths": np.full(n, 3, np.int32), "text_sentence": np.zeros((n, dt), np.float16)})
        store.set_column("status", index, DONE)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 synthetic products extracted with the tiny backbone, shared by a module's tests."""
    from hsl.extract import ExtractOptions, extract

    root = tmp_path_factory.mktemp("shop")
    store = root / "tiny.h5"
    extract(write_manifest(root, 160), store, ExtractOptions(backbone="tiny", workers=0, batch_size=32))
    return store


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "photos", 12)


@pytest.fixture
def fashion() -> Path:
    if not (FASHION / "products.csv").is_file():
        pytest.skip(f"real catalog not found at {FASHION} (it lives in ../shared/data/fashion beside the repo)")
    return FASHION


# -- the reliability report: tests/test_reliability.py and test_kills.py record each case they tried --
_RELIABILITY: list[dict] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--reliability-report", default=None,
                     help="write the table of reliability cases tried (docs/reliability.md) to this path")


@pytest.fixture
def reliability(request: pytest.FixtureRequest):
    """record(area, case, tries, outcome): one row of docs/reliability.md, kept only if the test passes."""
    rows: list[dict] = []
    request.node._reliability_rows = rows

    def record(area: str, case: str, tries: int, outcome: str) -> None:
        rows.append({"area": area, "case": case, "tries": tries, "outcome": outcome, "test": request.node.name})

    return record


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = (yield).get_result()
    rows = getattr(item, "_reliability_rows", None)
    if rows is not None and report.when == "call":
        if report.passed:
            _RELIABILITY.extend(rows)
        else:
            _RELIABILITY.append({"area": "FAILED", "case": item.name, "tries": 0, "outcome": "test failed",
                                 "test": item.name})


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = session.config.getoption("--reliability-report")
    if not path or not _RELIABILITY:
        return
    lines = ["# Reliability: what hsl survives", "",
             "Produced by the test suite, not written by hand. Reproduce with:", "",
             "```", f"python -m pytest tests/test_reliability.py tests/test_kills.py --reliability-report {path}",
             "```", "",
             "Every case passed in the run that wrote this file; a failing case would appear as FAILED.", "",
             _counts(_RELIABILITY), "",
             "| area | case | times | outcome | test |", "|---|---|---|---|---|"]
    for row in _RELIABILITY:
        outcome = row["outcome"].replace("|", "\\|")
        lines.append(f"| {row['area']} | {row['case']} | {row['tries']} | {outcome} | `{row['test']}` |")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _counts(rows: list[dict]) -> str:
    failed = sum(row["area"] == "FAILED" for row in rows)
    areas: dict[str, list[int]] = {}
    for row in rows:
        areas.setdefault(row["area"], [0, 0])
        areas[row["area"]][0] += 1
        areas[row["area"]][1] += row["tries"]
    per_area = "; ".join(f"{area}: {cases} cases, {tries} tries" for area, (cases, tries) in areas.items())
    return (f"{len(rows)} cases, {sum(r['tries'] for r in rows)} tries, "
            f"{'all passed' if not failed else f'{failed} FAILED'} ({per_area}).")


def tiny_config(folder: Path, name: str, changes: dict | None = None, **training: object) -> str:
    """hsl-tiny with these top-level `changes` and training settings, as the config file FOLDER/NAME.json."""
    config = json.loads((Path(__file__).parents[1] / "hsl/configs/hsl-tiny.json").read_text())
    config.update(changes or {})
    config["training"].update(training)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)
