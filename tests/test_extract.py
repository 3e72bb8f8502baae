"""hsl extract end to end on the tiny backbone: store contents, bad items, resume, kill."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hsl.errors import HSLUsageError, StoreMismatchError
from hsl.extract import ExtractOptions, extract
from hsl.store import DONE, FAILED, FeatureStore
from hsl_data.sources import Columns

from .conftest import store_features, write_folder, write_manifest

TINY = dict(backbone="tiny", workers=0, batch_size=4)


def test_folder_store_layout_readable_with_plain_h5py(photo_folder: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    report = extract(photo_folder, store, ExtractOptions(**TINY))
    assert (report.extracted, len(report.skipped)) == (12, 0)
    with h5py.File(store, "r") as f:
        ids = list(f["ids"].asstr()[:])
        assert ids[0] == "group0/item0000" and len(ids) == 12
        assert f["texts"].asstr()[0] == "red shirt 0"
        assert f["regions"].shape == (12, 16, 32) and f["regions"].dtype == np.int8  # codes (data/STORE.md)
        assert f["region_scale"].shape == (12, 16) and f["region_scale"].dtype == np.float16
        assert f["text_tokens"].shape == (12, 16, 24) and f["token_scale"].shape == (12, 16)
        assert f.attrs["backbone"] == "tiny" and int(f.attrs["schema_version"]) == 2
        assert (f["status"][:] == DONE).all()
        lengths = f["text_lengths"][:]
        assert lengths[0] == 3  # "red shirt 0"
        tokens = f["text_tokens"][0] * f["token_scale"][0][:, None].astype(np.float32)  # STORE.md's recipe
        assert np.abs(tokens[:3]).sum() > 0 and np.abs(tokens[3:]).sum() == 0


def test_rerun_extracts_nothing_twice_and_adds_new_and_changed(photo_folder: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    extract(photo_folder, store, ExtractOptions(**TINY))
    before = store_features(store)
    again = extract(photo_folder, store, ExtractOptions(**TINY))
    assert (again.extracted, again.already_done) == (0, 12)
    write_folder(tmp_path / "more", 14)  # two new photos beside copies of the old ones
    for name in ("item0012", "item0013"):
        for ext in (".jpg", ".txt"):
            src = tmp_path / "more" / "group0" / f"{name}{ext}"
            if src.exists():
                src.rename(photo_folder / "group0" / f"{name}{ext}")
    changed = photo_folder / "group1" / "item0001.jpg"
    Image.new("RGB", (48, 48), (0, 0, 0)).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = extract(photo_folder, store, ExtractOptions(**TINY))
    assert third.extracted == 2 and third.already_done == 11  # item0013 sits in group1: not moved
    after = store_features(store)
    row = list(after["ids"]).index("group1/item0001")
    assert not np.allclose(after["image_global"][row], before["image_global"][row])
    np.testing.assert_array_equal(after["image_global"][:1], before["image_global"][:1])


def test_manifest_bad_items_reported_and_skipped(tmp_path: Path) -> None:
    root = tmp_path / "shop"
    extra = [
        {"id": "p0", "image": "images/p1.jpg", "text": "duplicate id", "colour": "", "kind": ""},
        {"id": "empty_title", "image": "images/p1.jpg", "text": "  ", "colour": "", "kind": ""},
        {"id": "gone", "image": "images/gone.jpg", "text": "missing file", "colour": "", "kind": ""},
        {"id": "zero", "image": "images/zero.jpg", "text": "zero bytes", "colour": "", "kind": ""},
        {"id": "words", "image": "images/words.jpg", "text": "text file named jpg", "colour": "", "kind": ""},
        {"id": "cut", "image": "images/cut.jpg", "text": "truncated jpeg", "colour": "", "kind": ""},
        {"id": "bomb", "image": "images/bomb.png", "text": "too many pixels", "colour": "", "kind": ""},
        {"id": "grey16", "image": "images/grey16.png", "text": "sixteen bit grey", "colour": "", "kind": ""},
    ]
    manifest = write_manifest(root, 6, extra)
    images = root / "images"
    (images / "zero.jpg").write_bytes(b"")
    (images / "words.jpg").write_text("hello")
    jpeg = (images / "p0.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    Image.new("L", (2000, 2000)).save(images / "bomb.png")
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(images / "grey16.png")
    report = extract(manifest, tmp_path / "s.h5", ExtractOptions(**TINY, max_pixels=1_000_000))
    reasons = {s.id or s.where: s.reason for s in report.skipped}
    assert reasons == {"p0": "duplicate_id", "empty_title": "empty_text", "gone": "missing_file",
                       "zero": "empty_file", "words": "not_an_image", "cut": "truncated",
                       "bomb": "too_many_pixels"}
    assert report.extracted == 7  # p0..p5 and the 16-bit grey photo
    dup = next(s for s in report.skipped if s.reason == "duplicate_id")
    assert dup.where == "products.csv:8" and "products.csv:2" in dup.detail
    report.write_errors(tmp_path / "errors.jsonl")
    assert len((tmp_path / "errors.jsonl").read_text().splitlines()) == 7
    with FeatureStore.open(tmp_path / "s.h5") as store:
        status = dict(zip(store.strings("ids"), store.column("status"), strict=True))
        assert store.attributes()["colour"][:2] == ["red", "green"]
    assert status["cut"] == FAILED and status["grey16"] == DONE and "gone" not in status


def test_missing_manifest_column_is_a_usage_error(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "shop", 2)
    with pytest.raises(HSLUsageError, match="no column 'title'.*--text-column"):
        extract(manifest, tmp_path / "s.h5", ExtractOptions(**TINY, columns=Columns(text="title")))
    assert not (tmp_path / "s.h5").exists()


def test_image_template_builds_paths(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "shop", 3)
    text = manifest.read_text().replace("images/", "ignored/")
    manifest.write_text(text)
    options = ExtractOptions(**TINY, columns=Columns(image_template="images/{id}.jpg"))
    report = extract(manifest, tmp_path / "s.h5", options)
    assert report.extracted == 3


def test_other_backbone_refused_before_any_work(photo_folder: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    extract(photo_folder, store, ExtractOptions(**TINY))
    stamp = store.stat().st_mtime_ns
    with pytest.raises(StoreMismatchError, match="holds backbone 'tiny'"):
        extract(photo_folder, store, ExtractOptions(backbone="minilm-effnet", workers=0))
    assert store.stat().st_mtime_ns == stamp


def test_worker_processes_give_the_same_features(photo_folder: Path, tmp_path: Path) -> None:
    extract(photo_folder, tmp_path / "a.h5", ExtractOptions(**TINY))
    extract(photo_folder, tmp_path / "b.h5", ExtractOptions(backbone="tiny", workers=2, batch_size=5))
    a, b = store_features(tmp_path / "a.h5"), store_features(tmp_path / "b.h5")
    np.testing.assert_array_equal(a["ids"], b["ids"])
    np.testing.assert_allclose(a["regions"], b["regions"], atol=2e-3)


def test_openclip_tiny_config_extracts(photo_folder: Path, tmp_path: Path) -> None:
    report = extract(photo_folder, tmp_path / "s.h5", ExtractOptions(backbone="openclip:hsl-tiny-vit", workers=0))
    assert report.extracted == 12
    with FeatureStore.open(tmp_path / "s.h5") as store:
        assert store.meta["num_regions"] == 16 and store.meta["image_dim"] == 32


def test_real_photos_with_default_backbone(fashion: Path, tmp_path: Path) -> None:
    options = ExtractOptions(workers=1, limit=32, columns=Columns(text="productDisplayName",
                                                                 image_template="images/{id}.jpg"))
    report = extract(fashion / "products.csv", tmp_path / "real.h5", options)
    assert (report.extracted, len(report.skipped)) == (32, 0)
    with FeatureStore.open(tmp_path / "real.h5") as store:
        features = store.read_features(np.arange(32))
        assert store.meta["backbone"] == "minilm-effnet" and "articleType" in store.meta["attribute_columns"]
    regions = features["regions"].astype(np.float32)
    assert regions.shape == (32, 16, 1280) and np.isfinite(regions).all()  # the 4x4 grid the configs use
    # --grid 7 keeps the native cells: their mean is the whole-image vector, and pooling them to 4x4 gives
    # the default store's cells, within both stores' int8 rounding: half a step (largest |value| / 127, and
    # EfficientNet's ReLU6 features reach 6) each, so 0.047 at most.
    native = tmp_path / "native.h5"
    extract(fashion / "products.csv", native, replace(options, limit=4, grid=7))
    with FeatureStore.open(native) as store:
        cells = torch.from_numpy(store.read_features(np.arange(4))["regions"].astype(np.float32))
    assert cells.shape == (4, 49, 1280)
    np.testing.assert_allclose(cells.mean(1), features["image_global"][:4].astype(np.float32), atol=2e-2)
    pooled = F.adaptive_avg_pool2d(cells.transpose(1, 2).unflatten(2, (7, 7)), 4).flatten(2).transpose(1, 2)
    np.testing.assert_allclose(pooled.numpy(), regions[:4], atol=0.05)
    norms = np.linalg.norm(features["text_sentence"].astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-2)
