"""Training losses: small nn.Modules with explicit arguments, picked by name from a config.

Each loss is called as `loss(sims, keys)`: `sims` is HSLModel.similarities(text, image) for a batch
of matching (title, photo) pairs, so entry [i, i] of every matrix is the positive; `keys` [B] int
is equal for products with the same title, which are false negatives for each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import HSLUsageError

_SIM_NAMES = {"object": "S_obj", "image": "S_img"}


def false_negative_mask(keys: torch.Tensor) -> torch.Tensor:
    """[B,B] bool: True off the diagonal where the column's key equals the row's (same product/title)."""
    same = keys.unsqueeze(0) == keys.unsqueeze(1)  # [B,B]
    return same & ~torch.eye(len(keys), dtype=torch.bool, device=keys.device)  # [B,B]


def in_batch_cross_entropy(scores: torch.Tensor, false_negatives: torch.Tensor) -> torch.Tensor:
    """Mean over queries (rows) of the softmax cross-entropy against the diagonal, with false
    negatives removed from the softmax. A row without negatives costs exactly 0 (finite)."""
    logits = scores.masked_fill(false_negatives, float("-inf"))  # [B,B]
    target = torch.arange(len(scores), device=scores.device)  # [B]
    return F.cross_entropy(logits, target)


class HSLLoss(nn.Module):
    """The official HSL loss: for every level and configured granularity, cross-entropy of each
    query over the in-batch images (official ContrastiveLoss = nn.CrossEntropyLoss on the score
    matrix), weighted by the level weight; the scores are first multiplied by `logit_scale`."""

    def __init__(self, level_weights: Sequence[float], granularities: Sequence[str] = ("object", "image"),
                 logit_scale: float = 10.0):
        super().__init__()
        unknown = [g for g in granularities if g not in _SIM_NAMES]
        if unknown or not granularities:
            raise HSLUsageError(f"HSLLoss: granularities must be among {list(_SIM_NAMES)}, got {list(granularities)}")
        self.level_weights = [float(w) for w in level_weights]
        self.granularities = list(granularities)
        self.logit_scale = float(logit_scale)

    def forward(self, sims: dict, keys: torch.Tensor) -> torch.Tensor:
        false_negatives = None
        loss = torch.zeros(())
        for granularity in self.granularities:
            name = _SIM_NAMES[granularity]
            if name not in sims or len(sims[name]) != len(self.level_weights):
                raise HSLUsageError(f"HSLLoss needs {name} for {len(self.level_weights)} levels; the model "
                                    f"gave {len(sims.get(name, []))} (do the loss and model configs agree?)")
            for weight, scores in zip(self.level_weights, sims[name], strict=True):
                if false_negatives is None:
                    if scores.shape != (len(keys), len(keys)):
                        raise HSLUsageError(f"HSLLoss needs square [B,B] scores for B={len(keys)} keys, "
                                            f"got {tuple(scores.shape)}")
                    false_negatives = false_negative_mask(keys.to(scores.device))  # [B,B]
                    loss = loss.to(scores.device)
                loss = loss + weight * in_batch_cross_entropy(self.logit_scale * scores, false_negatives)
        return loss


def _hsl_loss(config: ModelConfig) -> nn.Module:
    return HSLLoss(config.level_weights, config.granularities, config.logit_scale)


# name -> builder from a config; SGML and HUSE losses register here as they arrive.
LOSS_BUILDERS: dict[str, Callable[[ModelConfig], nn.Module]] = {"hsl": _hsl_loss}


def build_losses(config: ModelConfig) -> dict[str, nn.Module]:
    """The loss modules named in config.losses (their weights stay in the config)."""
    losses = {}
    for name in config.losses:
        if name not in LOSS_BUILDERS:
            raise HSLUsageError(f"config {config.name!r}: unknown loss {name!r}; known: {sorted(LOSS_BUILDERS)}")
        losses[name] = LOSS_BUILDERS[name](config)
    return losses
