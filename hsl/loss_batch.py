"""What a loss sees of one training batch (`LossBatch`) and the pieces several losses share.

Its own module so that the loss modules (hsl/losses.py, hsl/sgml.py, hsl/huse.py) all import it,
and the registry in hsl/losses.py imports them, without a cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import EMBEDDINGS
from .errors import HSLUsageError
from .model import ImageEncoding, Similarities, TextEncoding, masked_mean


@dataclass
class LossBatch:
    """What a loss may look at for one training batch of B (title, photo) pairs. The trainer fills in
    what the losses' `needs` ask for (hsl/contract.py); a part no loss reads stays None."""

    keys: torch.Tensor  # [B] int, equal for duplicates of one product
    sims: Similarities | None = None  # HSLModel.similarities(text, image): [B,B] per level and in total
    text: TextEncoding | None = None
    image: ImageEncoding | None = None
    labels: dict[str, torch.Tensor] = field(default_factory=dict)  # column -> [B] long value index, -1 = missing
    index_vectors: torch.Tensor | None = None  # [B,D_idx] HSLModel.index_vectors(image)
    query_vectors: torch.Tensor | None = None  # [B,D_idx] HSLModel.query_vectors(text)
    # [B,B] bool, True where image j also matches text i (j != i); None: from `keys` (hsl/attribute_texts.py)
    false_negatives: torch.Tensor | None = None


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
