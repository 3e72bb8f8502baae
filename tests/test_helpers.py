"""The small shared helpers: stable top-k, token masks, atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hsl.atomic import write_atomic, write_text_atomic
from hsl.masks import token_mask
from hsl.store import FeatureStore, RowPlan
from hsl.top_k import top_k, top_k_rows


def test_top_k_breaks_ties_by_position_also_across_the_cut():
    scores = np.array([0.5, 0.9, 0.5, 0.9, 0.1, 0.5], np.float32)
    assert top_k(scores, 3).tolist() == [1, 3, 0]  # the third place: the first of three 0.5s
    assert top_k(scores, 10).tolist() == [1, 3, 0, 2, 5, 4]
    assert top_k(scores, 0).tolist() == []
    assert top_k(np.full(7, -np.inf), 2).tolist() == [0, 1]


@pytest.mark.parametrize("seed", range(5))
def test_top_k_equals_a_stable_full_sort(seed: int):
    scores = np.random.default_rng(seed).integers(0, 4, (6, 50)).astype(np.float32)  # many ties
    want = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(top_k_rows(scores, 10), want)
    assert top_k_rows(np.zeros((0, 5), np.float32), 3).shape == (0, 3)


def test_token_mask_keeps_one_token_of_an_empty_title():
    mask = token_mask(torch.tensor([3, 0, 5]), 4)
    assert mask.tolist() == [[True, True, True, False], [True, False, False, False], [True] * 4]


def test_atomic_write_replaces_the_file_whole(tmp_path: Path):
    path = tmp_path / "metrics.json"
    write_text_atomic(path, "old")

    def fails(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(path, fails)
    assert path.read_text() == "old"  # a failed write leaves the old file as it was
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and not (tmp_path / "metrics.json.tmp").exists()


def test_an_empty_string_in_the_store_meta_stays_a_string(tmp_path: Path):
    from hsl.backbones import create_backbone

    meta = {**create_backbone("tiny").describe(), "hsl_version": ""}  # "" is not JSON: it must not be parsed
    FeatureStore.build(tmp_path / "s.h5", meta, [RowPlan("a", "/a.jpg", "a title", {"kind": ""}, 1, 1)], ["kind"])
    with FeatureStore.open(tmp_path / "s.h5") as store:
        assert store.meta["hsl_version"] == "" and store.meta["attribute_columns"] == ["kind"]
        assert store.attributes()["kind"] == [""]
