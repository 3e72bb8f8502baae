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
import torch.nn.functional as F
from torch import nn

from .config import EMBEDDINGS, ModelConfig
from .errors import HSLUsageError
from .model import ImageEncoding, TextEncoding, index_dim, masked_mean

_SIM_NAMES = {"object": "S_obj", "image": "S_img"}


@dataclass
class LossBatch:
    """What a loss may look at for one training batch of B (title, photo) pairs."""

    sims: dict  # HSLModel.similarities(text, image): {"S_obj": [[B,B]...], "S_img": [...], "total": [B,B]}
    keys: torch.Tensor  # [B] int, equal for duplicates of one product
    text: TextEncoding | None = None
    image: ImageEncoding | None = None
    labels: dict[str, torch.Tensor] = field(default_factory=dict)  # column -> [B] long value index, -1 = missing
    index_vectors: torch.Tensor | None = None  # [B,D_idx] HSLModel.index_vectors(image)
    query_vectors: torch.Tensor | None = None  # [B,D_idx] HSLModel.query_vectors(text)


def loss_embeddings(batch: LossBatch, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(image [B,D], text [B,D]) L2-normalised embeddings that the SGML and HUSE objectives shape.

    "total": the one-vector index and query vectors, whose inner product is the HSL total score that
    search ranks by (exactly with agg = mean), so the objective acts on the ranking itself.
    "deepest": the deepest level's image granularity (v^L and q2^L; in object-only configs mean_k o_k^L
    and q1^L), the single term with the largest level weight.
    Normalised because the heads and the cosine-based losses need a bounded, scale-free input."""
    if which == "total":
        if batch.index_vectors is None or batch.query_vectors is None:
            raise HSLUsageError("this loss needs the batch's index and query vectors (LossBatch.index_vectors)")
        return F.normalize(batch.index_vectors, dim=-1), F.normalize(batch.query_vectors, dim=-1)
    if which != "deepest":
        raise HSLUsageError(f"embedding must be one of {list(EMBEDDINGS)}, got {which!r}")
    if batch.text is None or batch.image is None:
        raise HSLUsageError("this loss needs the batch's text and image encodings (LossBatch.text / .image)")
    if batch.image.images:
        image, text = batch.image.images[-1], batch.text.image_queries[-1]  # [B,J] each
    else:
        image = masked_mean(batch.image.objects[-1], batch.image.mask)  # [B,J]
        text = batch.text.object_queries[-1]  # [B,J]
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def batch_labels(batch: LossBatch, columns: Sequence[str]) -> torch.Tensor:
    """[B,C] long label indices of the named columns (-1 = missing)."""
    missing = [c for c in columns if c not in batch.labels]
    if missing:
        raise HSLUsageError(f"this loss needs labels of column {missing[0]!r}; the batch has {sorted(batch.labels)}")
    return torch.stack([batch.labels[c] for c in columns], dim=1)  # [B,C]


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
    from .sgml import SGMLLoss

    settings = config.sgml
    columns = list(context.attribute_weights)
    return SGMLLoss(columns, [context.attribute_weights[c] for c in columns], [len(context.vocab[c]) for c in columns],
                    _embedding_dim(config, settings.embedding), settings.alpha, settings.beta, settings.negative_cost,
                    settings.attribute_weight, settings.embedding, settings.logit_scale)


def _huse_loss(config: ModelConfig, context: LossContext) -> nn.Module:
    from .huse import HUSELoss

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
