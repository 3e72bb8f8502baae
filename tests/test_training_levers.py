"""Hard-negative batches (hsl/batches.py) and training texts from attribute columns (hsl/attribute_texts.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hsl.attribute_texts import AttributeTexts
from hsl.batches import epoch_batches
from hsl.train import TrainOptions, train

from .conftest import synthetic_store, tiny_config


def test_random_batches_cover_every_product_once() -> None:
    batches = epoch_batches(50, 8, torch.Generator().manual_seed(1))
    assert sorted(torch.cat(batches).tolist()) == list(range(50))
    assert [len(b) for b in batches] == [8] * 6 + [2]


def test_grouped_batches_are_runs_of_one_value_and_repeat_by_seed() -> None:
    groups = [f"type{i % 3}" for i in range(60)]
    first = epoch_batches(60, 12, torch.Generator().manual_seed(5), groups, group_size=4)
    again = epoch_batches(60, 12, torch.Generator().manual_seed(5), groups, group_size=4)
    other = epoch_batches(60, 12, torch.Generator().manual_seed(6), groups, group_size=4)
    order = torch.cat(first).tolist()
    assert sorted(order) == list(range(60))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert torch.cat(other).tolist() != order
    # each group of 20 is cut into runs of 4: consecutive runs of the epoch's order share one value
    runs = [order[i:i + 4] for i in range(0, 60, 4)]
    assert all(len({groups[j] for j in run}) == 1 for run in runs)


def tiny_texts(attributes: dict[str, list[str]], columns: list[str]) -> AttributeTexts:
    return AttributeTexts(attributes, columns, "tiny", max_text_tokens=16, precision="fp32")


def test_attribute_texts_name_the_kind_and_mask_every_product_that_matches() -> None:
    attributes = {"gender": ["Men", "Women", "Men", "Men"], "colour": ["Black", "Black", "Red", "Black"],
                  "kind": ["Shoes", "Shoes", "Shoes", "Shirts"]}
    texts = tiny_texts(attributes, ["gender", "colour", "kind", "missing"])
    assert texts.columns == ["gender", "colour", "kind"]  # a column the store lacks is left out
    # 4 variants each (kind always named); "shoes", "men shoes", "black shoes" are shared: 12 texts, not 16
    assert texts.variants == 4 and len(texts.tokens) == 12
    everyone = torch.arange(4)
    # "shoes" alone (variant 0) matches every shoe, never the shirt
    _, _, negatives = texts.batch(everyone, torch.zeros(4, dtype=torch.long))
    assert negatives.tolist() == [[False, True, True, False], [True, False, True, False],
                                  [True, True, False, False], [False, False, False, False]]
    # "men black shoes" (variant 3) matches only product 0 itself; "men red shoes" only product 2
    _, _, negatives = texts.batch(everyone, torch.full((4,), 3))
    assert not negatives.any()
    # "men shoes" (variant 1: gender kept) of product 0 matches product 2, a man's red shoe, not the woman's
    _, _, negatives = texts.batch(everyone, torch.ones(4, dtype=torch.long))
    assert negatives[0].tolist() == [False, False, True, False]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        tokens, mask, negatives = texts.draw(everyone, generator)
        assert tokens.shape[:2] == mask.shape and not negatives.diagonal().any()
        assert not negatives[:3, 3].any() and not negatives[3, :3].any()  # a shoe's text never names the shirt


def test_training_with_both_levers_records_them(tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    synthetic_store(store, 120)
    config = tiny_config(tmp_path, "levers", group_column="kind", group_size=4, text_columns=["kind"], epochs=2)
    record = train(store, tmp_path / "model", TrainOptions(config=config, precision="fp32"))
    assert record["batches"] == "runs of kind"
    assert record["attribute_texts"] == {"columns": ["kind"], "texts": 7}
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in record["history"])


def test_a_store_without_the_configured_columns_trains_as_before(tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    synthetic_store(store, 60)
    config = tiny_config(tmp_path, "levers", group_column="articleType", group_size=4, text_columns=["articleType"],
                         epochs=1)
    record = train(store, tmp_path / "a", TrainOptions(config=config, precision="fp32"))
    same = train(store, tmp_path / "b", TrainOptions(config=tiny_config(tmp_path, "plain", epochs=1), precision="fp32"))
    assert record["batches"] == "random" and record["attribute_texts"]["columns"] == []
    assert record["history"][0]["loss"] == pytest.approx(same["history"][0]["loss"])
