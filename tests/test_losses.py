"""Losses against values computed by hand (pytorch-metric-learning style), plus edge cases and backward()."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hsl.config import HSLLossConfig, config_from_dict, config_to_dict, list_configs, load_config
from hsl.contract import Needs
from hsl.errors import HSLUsageError
from hsl.factory import create_model, model_config
from hsl.losses import HSLLoss, LossBatch, build_losses, losses_need
from hsl.model import HSLModel, Similarities
from hsl_cli.main import app

SCORES = [[0.9, 0.2, 0.4],
          [0.3, 0.8, 0.1],
          [0.5, 0.6, 0.7]]


def scored(keys: torch.Tensor, objects: list | None = None, images: list | None = None) -> LossBatch:
    """A LossBatch of per-level matrices (the total's level weights do not matter to the loss)."""
    levels = len(objects or images)
    return LossBatch(keys, Similarities.weighted([1.0] * levels, objects, images))


def row_loss(row: list[float], positive: int, scale: float, keep: list[int] | None = None) -> float:
    """-log softmax(scale * row)[positive], the softmax over the columns in `keep` (default all)."""
    keep = range(len(row)) if keep is None else keep
    return -scale * row[positive] + math.log(sum(math.exp(scale * row[j]) for j in keep))


def test_single_matrix_by_hand():
    # Row 0: -2*0.9 + log(e^1.8 + e^0.4 + e^0.8) = -1.8 + log(6.0496 + 1.4918 + 2.2255) = 0.4789
    expected = sum(row_loss(SCORES[i], i, scale=2.0) for i in range(3)) / 3
    loss = HSLLoss([1.0], ["image"], logit_scale=2.0)(scored(torch.arange(3), images=[torch.tensor(SCORES)]))
    assert row_loss(SCORES[0], 0, 2.0) == pytest.approx(-1.8 + math.log(math.exp(1.8) + math.exp(0.4) + math.exp(0.8)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_levels_and_granularities_are_weighted_sums():
    matrices = [torch.tensor(SCORES) * factor for factor in (1.0, 0.5, -1.0, 2.0)]
    batch = scored(torch.arange(3), matrices[:2], matrices[2:])

    def ce(matrix):
        return sum(row_loss(matrix.tolist()[i], i, scale=3.0) for i in range(3)) / 3

    expected = 0.5 * (ce(matrices[0]) + ce(matrices[2])) + 1.0 * (ce(matrices[1]) + ce(matrices[3]))
    loss = HSLLoss([0.5, 1.0], ["object", "image"], logit_scale=3.0)(batch)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    image_only = HSLLoss([0.5, 1.0], ["image"], logit_scale=3.0)(batch)
    assert image_only.item() == pytest.approx(0.5 * ce(matrices[2]) + ce(matrices[3]), rel=1e-6)


def test_duplicate_keys_are_masked_by_hand():
    # Products 0 and 1 share a title: row 0 drops column 1, row 1 drops column 0, row 2 keeps all.
    keys = torch.tensor([7, 7, 3])
    expected = (row_loss(SCORES[0], 0, 1.0, keep=[0, 2]) + row_loss(SCORES[1], 1, 1.0, keep=[1, 2])
                + row_loss(SCORES[2], 2, 1.0)) / 3
    # row 0 by hand: -0.9 + log(e^0.9 + e^0.4) = log(1 + e^-0.5) = 0.4741
    assert row_loss(SCORES[0], 0, 1.0, keep=[0, 2]) == pytest.approx(math.log(1 + math.exp(-0.5)))
    loss = HSLLoss([1.0], ["image"], logit_scale=1.0)(scored(keys, images=[torch.tensor(SCORES)]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    unmasked = HSLLoss([1.0], ["image"], logit_scale=1.0)(scored(torch.arange(3), images=[torch.tensor(SCORES)]))
    assert loss.item() < unmasked.item()


def test_image_to_text_adds_each_photos_softmax_over_the_texts():
    """The symmetric loss: the columns' cross-entropy (photo j over the texts) added with its weight,
    the duplicate titles masked from the photo's side too."""
    keys = torch.tensor([7, 7, 3])
    columns = [list(c) for c in zip(*SCORES, strict=True)]  # column j: every text's score for photo j
    rows = (row_loss(SCORES[0], 0, 1.0, keep=[0, 2]) + row_loss(SCORES[1], 1, 1.0, keep=[1, 2])
            + row_loss(SCORES[2], 2, 1.0)) / 3
    cols = (row_loss(columns[0], 0, 1.0, keep=[0, 2]) + row_loss(columns[1], 1, 1.0, keep=[1, 2])
            + row_loss(columns[2], 2, 1.0)) / 3
    loss = HSLLoss([1.0], ["image"], logit_scale=1.0, image_to_text=0.5)(scored(keys, images=[torch.tensor(SCORES)]))
    assert loss.item() == pytest.approx(rows + 0.5 * cols, rel=1e-6)
    config = replace(load_config("hsl-tiny"), hsl=HSLLossConfig(image_to_text=0.5))
    assert build_losses(config)["hsl"].image_to_text == 0.5
    with pytest.raises(HSLUsageError, match="image_to_text"):
        config_from_dict({**config_to_dict(config), "hsl": {"image_to_text": -1}}, "bad.json")


@pytest.mark.parametrize("keys", [torch.tensor([4]), torch.tensor([2, 2, 2])])
def test_no_negatives_is_finite_with_finite_grads(keys):
    scores = torch.randn(len(keys), len(keys), requires_grad=True)
    loss = HSLLoss([1.0], ["object", "image"])(scored(keys, [scores], [scores * 2]))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(scores.grad).all()


def test_backward_through_the_tiny_model():
    config = load_config("hsl-tiny")
    torch.manual_seed(0)
    model = HSLModel(config, 12, 10).train()
    regions, tokens = torch.randn(6, 5, 12), torch.randn(6, 4, 10)
    region_mask, token_mask = torch.ones(6, 5, dtype=torch.bool), torch.ones(6, 4, dtype=torch.bool)
    region_mask[2, 3:], token_mask[4, 2:] = False, False
    sims = model.similarities(model.encode_text(tokens, token_mask), model.encode_image(regions, region_mask))
    losses = build_losses(config)
    loss = sum(w * losses[name](LossBatch(torch.tensor([0, 1, 1, 2, 3, 4]), sims)) for name, w in config.losses.items())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_build_losses_registry():
    config = load_config("hsl-tiny")
    losses = build_losses(config)
    assert list(losses) == ["hsl"] and isinstance(losses["hsl"], HSLLoss)
    assert losses["hsl"].level_weights == list(config.level_weights)
    with pytest.raises(HSLUsageError, match="'triplet'"):
        build_losses(replace(config, losses={"hsl": 1.0, "triplet": 0.5}))


def test_loss_and_model_disagreeing_is_a_usage_error():
    loss = HSLLoss([0.5, 1.0], ["object", "image"])
    with pytest.raises(HSLUsageError, match="no object granularity"):
        loss(scored(torch.arange(2), images=[torch.eye(2), torch.eye(2)]))
    with pytest.raises(HSLUsageError, match="for 2 levels; the model gave 1"):
        loss(scored(torch.arange(2), [torch.eye(2)], [torch.eye(2)]))
    with pytest.raises(HSLUsageError, match="square"):
        HSLLoss([1.0], ["image"])(scored(torch.arange(2), images=[torch.zeros(2, 3)]))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=2, max_size=6), st.integers(0, 1000))
def test_masking_duplicates_never_raises_the_loss(keys, seed):
    scores = torch.randn(len(keys), len(keys), generator=torch.Generator().manual_seed(seed))
    loss = HSLLoss([1.0], ["image"], logit_scale=5.0)
    masked = loss(scored(torch.tensor(keys), images=[scores]))
    assert 0.0 <= masked.item() <= loss(scored(torch.arange(len(keys)), images=[scores])).item() + 1e-6


def _config_file(tmp_path: Path, **changes: object) -> Path:
    data = {**config_to_dict(load_config("hsl-tiny")), "name": "bad-one", **changes}
    path = tmp_path / "bad-one.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_a_loss_needing_what_the_model_lacks_fails_when_the_config_loads(tmp_path: Path):
    path = _config_file(tmp_path, granularities=["image"], hsl={"granularities": ["object"]})
    with pytest.raises(HSLUsageError) as raised:
        model_config(path)
    line = str(raised.value)
    assert "\n" not in line and "config 'bad-one'" in line and "loss 'hsl'" in line
    assert "the object similarities" in line and "['image']" in line and 'add "object"' in line
    with pytest.raises(HSLUsageError, match="loss 'hsl' needs the object similarities"):
        create_model(load_config(path), 12, 10)
    result = CliRunner().invoke(app, ["train", "--store", str(tmp_path / "none.h5"), "--out", str(tmp_path / "m"),
                                      "--config", str(path)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "loss 'hsl' needs the object similarities" in lines[0]
    assert not (tmp_path / "m").exists()  # nothing written: the config failed before the store was read


def test_good_configs_load_and_their_losses_say_what_a_batch_needs(tmp_path: Path):
    for name in list_configs():
        assert model_config(name).name == name
    subset = model_config(_config_file(tmp_path, hsl={"granularities": ["image"]}))
    assert losses_need(subset) == Needs(granularities=("image",))
    assert build_losses(subset)["hsl"].granularities == ["image"]
    assert losses_need(load_config("hsl-tiny")) == Needs(granularities=("object", "image"))
    objectives = load_config("hsl-tiny-objectives")
    need = losses_need(objectives)
    assert need.granularities == ("object", "image") and need.vectors and need.class_distances
    assert objectives.huse.class_column in need.labels
    deepest = replace(objectives, losses={"sgml": 1.0}, sgml=replace(objectives.sgml, embedding="deepest"))
    assert losses_need(deepest) == Needs(encodings=True, labels=tuple(objectives.sgml.attributes))


def test_the_typed_similarities_total_is_the_weighted_sum_of_the_levels():
    config = load_config("hsl-tiny")
    torch.manual_seed(0)
    model = HSLModel(config, 12, 10).eval()
    regions, tokens = torch.randn(4, 5, 12), torch.randn(3, 4, 10)
    with torch.no_grad():
        sims = model.similarities(model.encode_text(tokens, torch.ones(3, 4, dtype=torch.bool)),
                                  model.encode_image(regions, torch.ones(4, 5, dtype=torch.bool)))
    by_hand = sum(w * (o + i) for w, o, i in zip(config.level_weights, sims.objects, sims.images, strict=True))
    torch.testing.assert_close(sims.total, by_hand, rtol=0, atol=1e-6)
    assert sims.levels("object") is sims.objects and sims.levels("image") is sims.images
    image_only = Similarities.weighted([0.5, 1.0], images=sims.images)
    assert image_only.objects is None and torch.equal(image_only.total, 0.5 * sims.images[0] + sims.images[1])
    with pytest.raises(HSLUsageError, match="no object granularity"):
        image_only.levels("object")
    with pytest.raises(HSLUsageError, match="granularity must be one of"):
        sims.levels("S_obj")
