"""SGML, semantic granularity metric learning (Manandhar, Bastan, Yap, 2019/2020), for text -> photo.

Two tasks on L2-normalised image and text embeddings (losses.loss_embeddings: by default the
one-vector index and query vectors whose inner product is the HSL total score; or the deepest
level's image granularity), linked by the attribute similarity of the products:

* a multitask attribute head: one linear layer (logits times `logit_scale`) from the embedding to a
  multi-hot over all (column, value) pairs, trained with binary cross-entropy on both the image and
  the text embedding (`L_attr`, the mean of the two). The BCE is summed over each column's values and
  averaged over the known (product, column) cells: one column then weighs like one classification
  loss, where a mean over all ~140 entries would shrink the attribute gradient ~20-fold;
* the soft binomial deviance (Yi et al. 2014) on the cosine s_ij of title i and photo j:
  `dev_ij = log(1 + exp(-alpha (s_ij - beta) m_ij))` with m_ij = +1 for a positive (same product key,
  the diagonal and duplicates) and -C for a negative. "Soft": each negative's deviance is multiplied
  by (1 - g_ij), where g_ij in [0, 1] is the weighted share of attribute columns on which products i
  and j agree, so a negative that shares every attribute is not pushed at all and one that shares
  none gets the full push. As in Yi et al., positives are averaged over the positive pairs and the
  weighted negatives summed and divided by the number of negative pairs (not by the sum of the
  weights, which would undo the softening batch by batch): `L_sbd = mean_pos dev + sum_neg (1 - g) dev / n_neg`.

Total: `L_sbd + lambda * L_attr`. The cosine of the embeddings, not the raw HSL score, goes into the
deviance: alpha and beta are calibrated for similarities in [-1, 1], while the raw score is an
unbounded weighted sum of unnormalised inner products. A missing attribute value (-1) matches
nothing in g_ij and is left out of the BCE.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .contract import Needs
from .errors import HSLUsageError
from .loss_batch import LossBatch, batch_labels, loss_embeddings


def attribute_similarity(labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """g [B,B]: sum_c w_c [a_ic == a_jc] / sum_c w_c over the columns of labels [B,C]; -1 matches nothing."""
    same = (labels.unsqueeze(1) == labels.unsqueeze(0)) & (labels >= 0).unsqueeze(1)  # [B,B,C]
    return (same.float() * weights).sum(dim=-1) / weights.sum()  # [B,B]


def soft_binomial_deviance(scores: torch.Tensor, positive: torch.Tensor, similarity: torch.Tensor, alpha: float,
                           beta: float, negative_cost: float) -> torch.Tensor:
    """L_sbd of scores [B,B] (rows: titles, columns: photos); positive [B,B] bool; similarity g [B,B]."""
    pos_dev = F.softplus(-alpha * (scores - beta))  # [B,B] m = +1
    neg_dev = F.softplus(alpha * negative_cost * (scores - beta))  # [B,B] m = -C
    negative = ~positive
    loss = scores.new_zeros(())
    if positive.any():
        loss = loss + pos_dev[positive].mean()
    if negative.any():
        loss = loss + ((1.0 - similarity) * neg_dev)[negative].sum() / negative.sum()
    return loss


class SGMLLoss(nn.Module):
    """L_sbd + attribute_weight * L_attr; see the module docstring."""

    def __init__(self, columns: Sequence[str], column_weights: Sequence[float], num_values: Sequence[int],
                 embed_dim: int, alpha: float = 2.0, beta: float = 0.5, negative_cost: float = 25.0,
                 attribute_weight: float = 1.0, embedding: str = "total", logit_scale: float = 10.0):
        super().__init__()
        if not columns or len(column_weights) != len(columns) or len(num_values) != len(columns):
            raise HSLUsageError(f"SGMLLoss needs one weight and one value count per attribute column, got columns "
                                f"{list(columns)}, weights {list(column_weights)}, counts {list(num_values)}")
        if min(num_values) < 1 or not sum(column_weights) > 0:
            raise HSLUsageError(f"SGMLLoss: every column needs a value and the weights a positive sum; got counts "
                                f"{list(num_values)} and weights {list(column_weights)} for {list(columns)}")
        self.columns = list(columns)
        self.register_buffer("column_weights", torch.tensor([float(w) for w in column_weights]), persistent=False)
        self.register_buffer("offsets", torch.tensor([0, *num_values[:-1]]).cumsum(0), persistent=False)
        self.alpha, self.beta, self.negative_cost = float(alpha), float(beta), float(negative_cost)
        self.attribute_weight = float(attribute_weight)
        self.embedding, self.logit_scale = embedding, float(logit_scale)
        self.head = nn.Linear(embed_dim, int(sum(num_values)))  # multi-hot over (column, value) pairs

    def attribute_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """BCE of head(embeddings [B,D]) against the multi-hot of labels [B,C], summed over each column's
        values and averaged over the known (product, column) cells."""
        logits = self.logit_scale * self.head(embeddings)  # [B,V]
        known = labels >= 0  # [B,C]
        target = torch.zeros_like(logits)
        rows, cols = known.nonzero(as_tuple=True)
        target[rows, self.offsets[cols] + labels[rows, cols]] = 1.0  # [B,V]
        sizes = torch.diff(self.offsets, append=self.offsets.new_tensor([logits.shape[1]]))  # [C] values per column
        valid = known.repeat_interleave(sizes, dim=1).float()  # [B,V]: entries of a missing column do not count
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # [B,V]
        return (bce * valid).sum() / known.sum().clamp(min=1)

    @staticmethod
    def needs(config: ModelConfig) -> Needs:
        settings = config.sgml  # no attributes named: every column of the store, known once it is read
        return Needs(vectors=settings.embedding == "total", encodings=settings.embedding == "deepest",
                     labels=tuple(settings.attributes))

    def forward(self, batch: LossBatch) -> torch.Tensor:
        image, text = loss_embeddings(batch, self.embedding)  # [B,D] each
        labels = batch_labels(batch, self.columns).to(image.device)  # [B,C]
        keys = batch.keys.to(image.device)
        positive = keys.unsqueeze(0) == keys.unsqueeze(1)  # [B,B], the diagonal and duplicate titles
        similarity = attribute_similarity(labels, self.column_weights)  # [B,B]
        scores = text @ image.T  # [B,B] cosine of title i and photo j
        sbd = soft_binomial_deviance(scores, positive, similarity, self.alpha, self.beta, self.negative_cost)
        attr = (self.attribute_loss(image, labels) + self.attribute_loss(text, labels)) / 2
        return sbd + self.attribute_weight * attr
