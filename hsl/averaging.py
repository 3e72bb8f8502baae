"""An exponential moving average of the model's weights (setting `training.average_decay`).

The heads train from scratch on fixed features, so where each run ends depends much on its last
steps: networks of different seeds score a few points apart on the same test split. Averaging the
weights over the last few hundred steps smooths that walk away at no cost at query time; the
average is what validation scores and what the model folder keeps.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """avg <- decay * avg + (1 - decay) * weights after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self._mine = list(self.model.parameters())
        self._theirs = list(model.parameters())

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._mine, self._theirs, 1.0 - self.decay)
