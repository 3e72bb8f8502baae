"""The compact store (schema 2: int8 codes + a scale per vector), schema 1 stores still working, reads
by blocks and scattered rows, and training that streams its batches from the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hsl.extract import ExtractOptions, extract
from hsl.store import DONE, FEATURES, FeatureStore, RowPlan, dequantize, quantize
from hsl.train import TrainOptions, train

from .conftest import store_features, synthetic_store, write_manifest


def test_int8_codes_are_within_half_a_step_of_each_vector() -> None:
    rng = np.random.default_rng(0)
    vectors = np.concatenate([rng.standard_normal((50, 64)) * rng.uniform(0.01, 20, (50, 1)),
                              np.zeros((1, 64)), np.abs(rng.standard_normal((5, 64))) * 6], axis=0)
    codes, scale = quantize(vectors)
    assert codes.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == (56,)
    back = dequantize(codes, scale).astype(np.float32)
    step = scale.astype(np.float32)[:, None]
    assert np.all(np.abs(back - vectors) <= 0.5 * step + 2e-3 * np.abs(vectors) + 1e-6)  # + float16 rounding
    assert np.all(back[50] == 0)


def test_scattered_rows_and_blocks_read_what_a_whole_read_gives(tmp_path: Path) -> None:
    synthetic_store(tmp_path / "s.h5", 3000)
    with FeatureStore.open(tmp_path / "s.h5") as store:
        everything = store.read_block(0, len(store))
        rows = np.sort(np.random.default_rng(1).choice(3000, 300, replace=False))
        picked = store.read_features(rows)
        walked = {name: [] for name in FEATURES}
        for part, block in store.blocks(np.arange(3000), block=700):
            assert len(part) <= 700
            for name in FEATURES:
                walked[name].append(block[name])
    for name in FEATURES:
        np.testing.assert_array_equal(picked[name], everything[name][rows])
        np.testing.assert_array_equal(np.concatenate(walked[name]), everything[name])


def _schema1_store(path: Path, n: int) -> None:
    """A store as hsl wrote them before schema 2: float16 regions and tokens."""
    from hsl.backbones import create_backbone

    meta = {**create_backbone("tiny").describe(), "hsl_version": "old", "schema_version": 1}
    rows = [RowPlan(f"old{i}", f"/nowhere/old{i}.jpg", f"old product {i}", {"colour": "red"}, 1, 1) for i in range(n)]
    FeatureStore.build(path, meta, rows, ["colour"])
    rng = np.random.default_rng(0)
    with FeatureStore.open(path, writable=True) as store:
        store.write_features(np.arange(n), {
            "image_global": rng.standard_normal((n, 32)).astype(np.float16),
            "regions": rng.standard_normal((n, 16, 32)).astype(np.float16),
            "region_mask": np.ones((n, 16), np.uint8),
            "text_tokens": rng.standard_normal((n, 16, 24)).astype(np.float16),
            "text_lengths": np.full(n, 3, np.int32), "text_sentence": np.zeros((n, 24), np.float16)})
        store.set_column("status", np.arange(n), DONE)


def test_a_schema1_store_is_read_as_it_is_and_becomes_schema2_when_extended(tmp_path: Path) -> None:
    old = tmp_path / "old.h5"
    _schema1_store(old, 20)
    with FeatureStore.open(old) as store:
        assert store.schema == 1 and store.read_features(np.arange(3))["regions"].dtype == np.float16
    before = store_features(old)
    manifest = write_manifest(tmp_path / "shop", 5)  # new products: the file is rebuilt, old rows carried over
    extract(manifest, old, ExtractOptions(backbone="tiny", workers=0))
    with FeatureStore.open(old) as store:
        assert store.schema == 2 and len(store) == 25
    after = store_features(old)
    assert list(after["ids"][:20]) == list(before["ids"])
    for name in ("regions", "text_tokens"):  # converted to codes: equal within half a step of each vector
        got, want = after[name][:20].astype(np.float32), before[name].astype(np.float32)
        step = np.abs(want).max(axis=-1, keepdims=True) / 127
        assert np.all(np.abs(got - want) <= 0.5 * step + 1e-2 * np.abs(want) + 1e-3)
    np.testing.assert_array_equal(after["image_global"][:20], before["image_global"])


def test_a_store_from_a_newer_hsl_is_one_line(tmp_path: Path) -> None:
    import h5py

    from hsl.errors import HSLError

    synthetic_store(tmp_path / "s.h5", 4)
    with h5py.File(tmp_path / "s.h5", "r+") as f:
        f.attrs["schema_version"] = 9
    with pytest.raises(HSLError, match="newer version of hsl .*upgrade hsl"):
        FeatureStore.open(tmp_path / "s.h5")


def test_streamed_training_gives_the_weights_of_in_memory_training(tmp_path: Path) -> None:
    synthetic_store(tmp_path / "s.h5", 400)
    small = TrainOptions(config="hsl-tiny", epochs=2, batch_size=32)
    memory = train(tmp_path / "s.h5", tmp_path / "memory", small)
    streamed = train(tmp_path / "s.h5", tmp_path / "streamed", TrainOptions(**{**small.__dict__, "memory_budget": 0}))
    assert (memory["streamed"], streamed["streamed"]) == (False, True)
    assert ((tmp_path / "memory" / "model.safetensors").read_bytes()
            == (tmp_path / "streamed" / "model.safetensors").read_bytes())
    assert streamed["history"][-1]["peak_rss_mb"] > 0


def test_max_products_trains_on_a_seeded_sample(tmp_path: Path) -> None:
    synthetic_store(tmp_path / "s.h5", 400)
    record = train(tmp_path / "s.h5", tmp_path / "m", TrainOptions(config="hsl-tiny", epochs=1, max_products=50))
    assert record["split"]["train"] == 50 and record["split"]["val"] <= 100
    train(tmp_path / "s.h5", tmp_path / "m2", TrainOptions(config="hsl-tiny", epochs=1, max_products=50))
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (tmp_path / "m2" / "model.safetensors").read_bytes()
