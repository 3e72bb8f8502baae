"""Training losses: small nn.Modules with explicit arguments, picked by name from a config.

Each loss is called as `loss(batch)` with one LossBatch: `sims` is HSLModel.similarities(text, image)
for a batch of matching (title, photo) pairs, so entry [i, i] of every matrix is the positive; `keys`
[B] int is equal for products with the same title, which are false negatives for each other; the
encodings and per-column label indices are there for the losses that need more (SGML, HUSE).
Losses with parameters (heads) are trained with the model and kept in its checkpoint, never in the
model weights that search loads (hsl/objectives.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import ModelConfig
from .errors import HSLUsageError
from .huse import HUSELoss
from .loss_batch import LossBatch, false_negative_mask, in_batch_cross_entropy
from .model import index_dim
from .sgml import SGMLLoss

_SIM_NAMES = {"object": "S_obj", "image": "S_img"}


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

    def forward(self, batch: LossBatch) -> torch.Tensor:
        sims, keys = batch.sims, batch.keys
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


@dataclass
class LossContext:
    """Data-dependent sizes of the loss heads, fixed at train start (hsl/objectives.py builds it)."""

    vocab: dict[str, list[str]] = field(default_factory=dict)  # column -> its values, index = label
    attribute_weights: dict[str, float] = field(default_factory=dict)  # SGML columns -> weight in g_ij
    class_distances: torch.Tensor | None = None  # HUSE A [K,K]: cosine distances of the class names


def _embedding_dim(config: ModelConfig, which: str) -> int:
    return index_dim(config) if which == "total" else config.joint_dim


def _hsl_loss(config: ModelConfig, context: LossContext) -> nn.Module:
    return HSLLoss(config.level_weights, config.granularities, config.logit_scale)


def _sgml_loss(config: ModelConfig, context: LossContext) -> nn.Module:
    settings = config.sgml
    columns = list(context.attribute_weights)
    return SGMLLoss(columns, [context.attribute_weights[c] for c in columns], [len(context.vocab[c]) for c in columns],
                    _embedding_dim(config, settings.embedding), settings.alpha, settings.beta, settings.negative_cost,
                    settings.attribute_weight, settings.embedding, settings.logit_scale)


def _huse_loss(config: ModelConfig, context: LossContext) -> nn.Module:
    settings = config.huse
    if context.class_distances is None:
        raise HSLUsageError(f"config {config.name!r}: the huse loss needs the class-name distances (LossContext)")
    return HUSELoss(settings.class_column, context.class_distances, _embedding_dim(config, settings.embedding),
                    settings.class_weight, settings.graph_weight, settings.gap_weight, settings.zeta,
                    settings.embedding, settings.logit_scale)


# name -> builder from a config and the training data's context
LOSS_BUILDERS: dict[str, Callable[[ModelConfig, LossContext], nn.Module]] = {
    "hsl": _hsl_loss, "sgml": _sgml_loss, "huse": _huse_loss}


def build_losses(config: ModelConfig, context: LossContext | None = None) -> dict[str, nn.Module]:
    """The loss modules named in config.losses (their weights stay in the config)."""
    context = context or LossContext()
    losses = {}
    for name in config.losses:
        if name not in LOSS_BUILDERS:
            raise HSLUsageError(f"config {config.name!r}: unknown loss {name!r}; known: {sorted(LOSS_BUILDERS)}")
        losses[name] = LOSS_BUILDERS[name](config, context)
    return losses
