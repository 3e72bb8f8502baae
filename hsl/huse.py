"""HUSE, hierarchical universal semantic embeddings (Narayana et al., 2019), for text -> photo.

On L2-normalised image and text embeddings (losses.loss_embeddings: by default the one-vector index
and query vectors whose inner product is the HSL total score; or the deepest level's image
granularity), with the class y of each product from one attribute column (articleType on our catalog):

* `L_cls`: one linear classifier (logits times `logit_scale`) shared by both modalities, so image and
  text embeddings of a class fall on the same side of the same hyperplanes; mean of the two
  cross-entropies.
* `L_graph`: over all ordered pairs m != n of the 2B embeddings (B images and B titles together),
  `L_graph = sum_mn sigma_mn (d(x_m, x_n) - A[y_m, y_n])^2 / #pairs` with d the cosine distance
  1 - cos and A the cosine distances between the text backbone's sentence embeddings of the class
  names; sigma_mn = 1 when both d(x_m, x_n) < zeta and A[y_m, y_n] < zeta, else 0. Pairs far apart in
  the embedding or between unrelated classes are left alone; among close pairs, embedding distance
  is pulled towards the distance of the class names (0 for the same class).
* `L_gap`: mean over pairs of the squared distance between the normalised image and title
  embeddings of the same product, ||x_img - x_txt||^2 = 2 - 2 cos.

`L = a L_cls + b L_graph + c L_gap`. Products whose class is missing (-1) are left out of L_cls and
L_graph (they still count in L_gap, which needs no class).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .contract import Needs
from .errors import HSLUsageError
from .loss_batch import LossBatch, batch_labels, loss_embeddings


def class_name_distances(sentences: torch.Tensor) -> torch.Tensor:
    """A [K,K]: cosine distances 1 - cos between the class names' sentence embeddings [K,D]."""
    unit = F.normalize(sentences.float(), dim=-1)
    return (1.0 - unit @ unit.T).clamp(min=0.0).fill_diagonal_(0.0)  # exact zeros on the diagonal


def semantic_graph_loss(embeddings: torch.Tensor, labels: torch.Tensor, class_distances: torch.Tensor,
                        zeta: float) -> torch.Tensor:
    """L_graph of unit embeddings [N,J] with labels [N] (-1 = missing) and class distances A [K,K]."""
    distance = 1.0 - embeddings @ embeddings.T  # [N,N]
    known = labels >= 0
    pair = known.unsqueeze(0) & known.unsqueeze(1)  # [N,N]
    pair &= ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    safe = labels.clamp(min=0)
    target = class_distances[safe][:, safe]  # [N,N] A[y_m, y_n]
    sigma = pair & (distance < zeta) & (target < zeta)  # [N,N]
    if not pair.any():
        return embeddings.new_zeros(())
    return ((distance - target) ** 2 * sigma).sum() / pair.sum()


class HUSELoss(nn.Module):
    """a L_cls + b L_graph + c L_gap; see the module docstring."""

    def __init__(self, class_column: str, class_distances: torch.Tensor, embed_dim: int, class_weight: float = 1.0,
                 graph_weight: float = 1.0, gap_weight: float = 1.0, zeta: float = 0.5, embedding: str = "total",
                 logit_scale: float = 10.0):
        super().__init__()
        shape = tuple(class_distances.shape)
        if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 1:
            raise HSLUsageError(f"HUSELoss needs a square [K,K] class-distance matrix with K >= 1, got "
                                f"{shape}")
        self.class_column = class_column
        self.class_weight, self.graph_weight = float(class_weight), float(graph_weight)
        self.gap_weight = float(gap_weight)
        self.zeta = float(zeta)
        self.embedding, self.logit_scale = embedding, float(logit_scale)
        self.register_buffer("class_distances", class_distances.float().clone())  # saved: eval needs no backbone
        self.classifier = nn.Linear(embed_dim, len(class_distances))  # shared by image and text

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B,K] class scores of unit embeddings [B,D]; the same layer for images and titles."""
        return self.logit_scale * self.classifier(embeddings)

    @staticmethod
    def needs(config: ModelConfig) -> Needs:
        settings = config.huse
        return Needs(vectors=settings.embedding == "total", encodings=settings.embedding == "deepest",
                     labels=(settings.class_column,), class_distances=True)

    def forward(self, batch: LossBatch) -> torch.Tensor:
        image, text = loss_embeddings(batch, self.embedding)  # [B,D] each
        labels = batch_labels(batch, [self.class_column])[:, 0].to(image.device)  # [B]
        loss = self.gap_weight * (image - text).pow(2).sum(dim=1).mean()
        if (labels >= 0).any():  # cross_entropy over nothing but ignored rows is NaN
            cls = (F.cross_entropy(self.logits(image), labels, ignore_index=-1)
                   + F.cross_entropy(self.logits(text), labels, ignore_index=-1)) / 2
            loss = loss + self.class_weight * cls
        both = torch.cat([image, text])  # [2B,J]
        graph = semantic_graph_loss(both, torch.cat([labels, labels]), self.class_distances, self.zeta)
        return loss + self.graph_weight * graph
