"""Training losses: small nn.Modules with explicit arguments, picked by name from a config.

Each loss is called as `loss(batch)` with one LossBatch: `sims` is HSLModel.similarities(text, image)
for a batch of matching (title, photo) pairs, so entry [i, i] of every matrix is the positive; `keys`
[B] int is equal for products with the same title, which are false negatives for each other; the
encodings and per-column label indices are there for the losses that need more (SGML, HUSE).
Each loss class says what it reads (`needs(config)`, hsl/contract.py), and `check_config` holds a
config's losses to what its model produces when the config loads.
Losses with parameters (heads) are trained with the model and kept in its checkpoint, never in the
model weights that search loads (hsl/objectives.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import GRANULARITIES, ModelConfig
from .contract import Needs
from .errors import HSLUsageError
from .huse import HUSELoss
from .loss_batch import LossBatch, false_negative_mask, in_batch_cross_entropy
from .model import index_dim
from .sgml import SGMLLoss


class HSLLoss(nn.Module):
    """The official HSL loss: for every level and configured granularity, cross-entropy of each
    query over the in-batch images (official ContrastiveLoss = nn.CrossEntropyLoss on the score
    matrix), weighted by the level weight; the scores are first multiplied by `logit_scale`. With
    `image_to_text` > 0, each photo's cross-entropy over the batch's texts is added with that weight
    (the symmetric loss of CLIP; the same false negatives, seen from the photo)."""

    def __init__(self, level_weights: Sequence[float], granularities: Sequence[str] = ("object", "image"),
                 logit_scale: float = 10.0, image_to_text: float = 0.0):
        super().__init__()
        unknown = [g for g in granularities if g not in GRANULARITIES]
        if unknown or not granularities:
            raise HSLUsageError(f"HSLLoss: granularities must be among {list(GRANULARITIES)}, "
                                f"got {list(granularities)}")
        self.level_weights = [float(w) for w in level_weights]
        self.granularities = list(granularities)
        self.logit_scale = float(logit_scale)
        self.image_to_text = float(image_to_text)

    @staticmethod
    def needs(config: ModelConfig) -> Needs:
        return Needs(granularities=hsl_granularities(config))

    def forward(self, batch: LossBatch) -> torch.Tensor:
        keys = batch.keys
        if batch.sims is None:
            raise HSLUsageError("HSLLoss needs the batch's similarities (LossBatch.sims)")
        false_negatives = None
        loss = torch.zeros(())
        for granularity in self.granularities:
            levels = batch.sims.levels(granularity)
            if len(levels) != len(self.level_weights):
                raise HSLUsageError(f"HSLLoss needs {granularity} similarities for {len(self.level_weights)} "
                                    f"levels; the model gave {len(levels)}")
            for weight, scores in zip(self.level_weights, levels, strict=True):
                if false_negatives is None:
                    if scores.shape != (len(keys), len(keys)):
                        raise HSLUsageError(f"HSLLoss needs square [B,B] scores for B={len(keys)} keys, "
                                            f"got {tuple(scores.shape)}")
                    false_negatives = (batch.false_negatives.to(scores.device) if batch.false_negatives is not None
                                       else false_negative_mask(keys.to(scores.device)))  # [B,B]
                    loss = loss.to(scores.device)
                loss = loss + weight * in_batch_cross_entropy(self.logit_scale * scores, false_negatives)
                if self.image_to_text:
                    loss = loss + weight * self.image_to_text * in_batch_cross_entropy(
                        self.logit_scale * scores.T, false_negatives.T)
        return loss


@dataclass
class LossContext:
    """Data-dependent sizes of the loss heads, fixed at train start (hsl/objectives.py builds it)."""

    vocab: dict[str, list[str]] = field(default_factory=dict)  # column -> its values, index = label
    attribute_weights: dict[str, float] = field(default_factory=dict)  # SGML columns -> weight in g_ij
    class_distances: torch.Tensor | None = None  # HUSE A [K,K]: cosine distances of the class names


def _embedding_dim(config: ModelConfig, which: str) -> int:
    return index_dim(config) if which == "total" else config.joint_dim


def hsl_granularities(config: ModelConfig) -> tuple[str, ...]:
    """The granularities the "hsl" loss trains: its block's, else the model's."""
    chosen = config.hsl.granularities if config.hsl is not None else None
    return chosen if chosen is not None else config.granularities


def hsl_loss(config: ModelConfig) -> HSLLoss:
    """The "hsl" loss of a config (also what the shopper texts of hsl/attribute_texts.py train with)."""
    image_to_text = config.hsl.image_to_text if config.hsl is not None else 0.0
    return HSLLoss(config.all_level_weights, hsl_granularities(config), config.logit_scale, image_to_text)


def _hsl_loss(config: ModelConfig, context: LossContext) -> nn.Module:
    return hsl_loss(config)


def _sgml_loss(config: ModelConfig, context: LossContext) -> nn.Module:
    settings = config.sgml
    columns = list(context.attribute_weights)
    return SGMLLoss(columns, [context.attribute_weights[c] for c in columns], [len(context.vocab[c]) for c in columns],
                    _embedding_dim(config, settings.embedding), settings.alpha, settings.beta, settings.negative_cost,
                    settings.attribute_weight, settings.embedding, settings.logit_scale)


def _huse_loss(config: ModelConfig, context: LossContext) -> nn.Module:
    settings = config.huse
    return HUSELoss(settings.class_column, context.class_distances, _embedding_dim(config, settings.embedding),
                    settings.class_weight, settings.graph_weight, settings.gap_weight, settings.zeta,
                    settings.embedding, settings.logit_scale)


@dataclass(frozen=True)
class LossKind:
    """One loss a config may name: its class (whose `needs(config)` says what it reads of a batch) and
    its builder from a config and the training data's context."""

    loss: type[HSLLoss] | type[SGMLLoss] | type[HUSELoss]
    build: Callable[[ModelConfig, LossContext], nn.Module]


LOSSES: dict[str, LossKind] = {"hsl": LossKind(HSLLoss, _hsl_loss), "sgml": LossKind(SGMLLoss, _sgml_loss),
                               "huse": LossKind(HUSELoss, _huse_loss)}


def check_config(config: ModelConfig) -> ModelConfig:
    """The config itself when its model produces everything its losses read; else one HSLUsageError line
    naming the config, the loss, what is missing and what to change."""
    produced = config.produces()
    for name in config.losses:
        if name not in LOSSES:
            raise HSLUsageError(f"config {config.name!r}: unknown loss {name!r}; known: {sorted(LOSSES)}")
        missing = LOSSES[name].loss.needs(config).missing(produced, name)
        if missing:
            what, fix = missing[0]  # one line: the first thing missing says what to change
            raise HSLUsageError(f"config {config.name!r}: loss {name!r} needs {what}, which its model "
                                f"(granularities {list(config.granularities)}) does not produce; {fix}")
    return config


def losses_need(config: ModelConfig) -> Needs:
    """Everything the config's losses read of a batch together: what training computes per batch."""
    needs = Needs()
    for name in check_config(config).losses:
        needs = needs | LOSSES[name].loss.needs(config)
    return needs


def build_losses(config: ModelConfig, context: LossContext | None = None) -> dict[str, nn.Module]:
    """The loss modules named in config.losses (their weights stay in the config)."""
    context = context or LossContext()
    for name in check_config(config).losses:  # the data's part of the contract (the model's: check_config)
        if LOSSES[name].loss.needs(config).class_distances and context.class_distances is None:
            raise HSLUsageError(f"config {config.name!r}: the {name} loss needs the class-name distances "
                                "(LossContext)")
    return {name: LOSSES[name].build(config, context) for name in config.losses}
