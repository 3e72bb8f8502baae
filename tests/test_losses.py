"""Losses against values computed by hand (pytorch-metric-learning style), plus edge cases and backward()."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsl.config import load_config
from hsl.errors import HSLUsageError
from hsl.losses import HSLLoss, LossBatch, build_losses
from hsl.model import HSLModel

SCORES = [[0.9, 0.2, 0.4],
          [0.3, 0.8, 0.1],
          [0.5, 0.6, 0.7]]


def row_loss(row: list[float], positive: int, scale: float, keep: list[int] | None = None) -> float:
    """-log softmax(scale * row)[positive], the softmax over the columns in `keep` (default all)."""
    keep = range(len(row)) if keep is None else keep
    return -scale * row[positive] + math.log(sum(math.exp(scale * row[j]) for j in keep))


def test_single_matrix_by_hand():
    # Row 0: -2*0.9 + log(e^1.8 + e^0.4 + e^0.8) = -1.8 + log(6.0496 + 1.4918 + 2.2255) = 0.4789
    expected = sum(row_loss(SCORES[i], i, scale=2.0) for i in range(3)) / 3
    loss = HSLLoss([1.0], ["image"], logit_scale=2.0)(LossBatch({"S_img": [torch.tensor(SCORES)]}, torch.arange(3)))
    assert row_loss(SCORES[0], 0, 2.0) == pytest.approx(-1.8 + math.log(math.exp(1.8) + math.exp(0.4) + math.exp(0.8)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_levels_and_granularities_are_weighted_sums():
    matrices = [torch.tensor(SCORES) * factor for factor in (1.0, 0.5, -1.0, 2.0)]
    sims = {"S_obj": matrices[:2], "S_img": matrices[2:]}

    def ce(matrix):
        return sum(row_loss(matrix.tolist()[i], i, scale=3.0) for i in range(3)) / 3

    expected = 0.5 * (ce(matrices[0]) + ce(matrices[2])) + 1.0 * (ce(matrices[1]) + ce(matrices[3]))
    loss = HSLLoss([0.5, 1.0], ["object", "image"], logit_scale=3.0)(LossBatch(sims, torch.arange(3)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    image_only = HSLLoss([0.5, 1.0], ["image"], logit_scale=3.0)(LossBatch(sims, torch.arange(3)))
    assert image_only.item() == pytest.approx(0.5 * ce(matrices[2]) + ce(matrices[3]), rel=1e-6)


def test_duplicate_keys_are_masked_by_hand():
    # Products 0 and 1 share a title: row 0 drops column 1, row 1 drops column 0, row 2 keeps all.
    keys = torch.tensor([7, 7, 3])
    expected = (row_loss(SCORES[0], 0, 1.0, keep=[0, 2]) + row_loss(SCORES[1], 1, 1.0, keep=[1, 2])
                + row_loss(SCORES[2], 2, 1.0)) / 3
    # row 0 by hand: -0.9 + log(e^0.9 + e^0.4) = log(1 + e^-0.5) = 0.4741
    assert row_loss(SCORES[0], 0, 1.0, keep=[0, 2]) == pytest.approx(math.log(1 + math.exp(-0.5)))
    loss = HSLLoss([1.0], ["image"], logit_scale=1.0)(LossBatch({"S_img": [torch.tensor(SCORES)]}, keys))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    unmasked = HSLLoss([1.0], ["image"], logit_scale=1.0)(LossBatch({"S_img": [torch.tensor(SCORES)]}, torch.arange(3)))
    assert loss.item() < unmasked.item()


@pytest.mark.parametrize("keys", [torch.tensor([4]), torch.tensor([2, 2, 2])])
def test_no_negatives_is_finite_with_finite_grads(keys):
    scores = torch.randn(len(keys), len(keys), requires_grad=True)
    loss = HSLLoss([1.0], ["object", "image"])(LossBatch({"S_obj": [scores], "S_img": [scores * 2]}, keys))
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
    loss = sum(w * losses[name](LossBatch(sims, torch.tensor([0, 1, 1, 2, 3, 4]))) for name, w in config.losses.items())
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
    with pytest.raises(HSLUsageError, match="S_obj"):
        loss(LossBatch({"S_img": [torch.eye(2), torch.eye(2)]}, torch.arange(2)))
    with pytest.raises(HSLUsageError, match="square"):
        HSLLoss([1.0], ["image"])(LossBatch({"S_img": [torch.zeros(2, 3)]}, torch.arange(2)))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=2, max_size=6), st.integers(0, 1000))
def test_masking_duplicates_never_raises_the_loss(keys, seed):
    scores = torch.randn(len(keys), len(keys), generator=torch.Generator().manual_seed(seed))
    loss = HSLLoss([1.0], ["image"], logit_scale=5.0)
    masked = loss(LossBatch({"S_img": [scores]}, torch.tensor(keys)))
    assert 0.0 <= masked.item() <= loss(LossBatch({"S_img": [scores]}, torch.arange(len(keys)))).item() + 1e-6
