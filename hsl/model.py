"""The HSL network (Ma et al., ICASSP 2021), following the official code (github.com/liufh1/HSL).

Image: regions -> in_fc -> L stacked transformer levels; per level, object vectors O^l = fc(H^l)
and an image vector v^l = AttFlat(fc(relu(O^l))), both L2-normalised. Text: tokens -> in_fc -> L
stacked levels; per level the mean over valid tokens t^l and two query heads q1^l (objects) and
q2^l (image). Scores: S_obj^l = AGG_k <q1^l, o_k^l>, S_img^l = <q2^l, v^l>, total = sum_l w_l (...)
over the configured granularities. Masks are bool with True = valid (a real region or token).

Members (config `members` K > 1): K networks of the same config, each trained on its own
(hsl/members.py), scored as one network whose levels are the K members' levels in turn: the total
score is the sum of the members' scores, and the index and query vectors are theirs concatenated, so
one inner product still ranks exactly. The first member's weights keep the names of a single
network; the others live under `other_members.k.`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import GRANULARITIES, ModelConfig
from .dropout import use_fast_dropout
from .errors import HSLUsageError
from .packed import check_layer, encoder_on_valid, packed_layer, packed_mean, rows_to_compute
from .precision import Precision


@dataclass
class ImageEncoding:
    """Everything HSL needs from a batch of images; depends on the images alone (index once)."""

    objects: list[torch.Tensor]  # per level [B,R,J], L2-normalised, padded rows are junk: use mask
    images: list[torch.Tensor]  # per level [B,J], L2-normalised; empty without the image granularity
    mask: torch.Tensor  # [B,R] bool, True = valid region

    def select(self, index: torch.Tensor) -> ImageEncoding:
        return ImageEncoding([o[index] for o in self.objects], [v[index] for v in self.images], self.mask[index])


@dataclass
class TextEncoding:
    object_queries: list[torch.Tensor]  # q1 per level [B,J]; empty without the object granularity
    image_queries: list[torch.Tensor]  # q2 per level [B,J]; empty without the image granularity

    def select(self, index: torch.Tensor) -> TextEncoding:
        return TextEncoding([q[index] for q in self.object_queries], [q[index] for q in self.image_queries])


@dataclass(frozen=True)
class Similarities:
    """Scores of Bt texts against Bi images: one [Bt,Bi] matrix per level for each granularity the
    model has (None for one it lacks), and their level-weighted total, which search ranks by."""

    objects: list[torch.Tensor] | None  # S_obj^l per level
    images: list[torch.Tensor] | None  # S_img^l per level
    total: torch.Tensor  # [Bt,Bi] sum_l w_l (S_obj^l + S_img^l) over the present granularities

    @classmethod
    def weighted(cls, level_weights: Sequence[float], objects: list[torch.Tensor] | None = None,
                 images: list[torch.Tensor] | None = None) -> Similarities:
        """The levels with their total; the terms are added in level order, objects before images."""
        total: Any = 0.0
        for level, weight in enumerate(level_weights):
            for part in (objects, images):
                if part is not None:
                    total = total + weight * part[level]  # [Bt,Bi]
        return cls(objects, images, total)

    def levels(self, granularity: str) -> list[torch.Tensor]:
        """The per-level matrices of one granularity ("object" or "image")."""
        if granularity not in GRANULARITIES:
            raise HSLUsageError(f"granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
        part = self.objects if granularity == "object" else self.images
        if part is None:
            raise HSLUsageError(f"these similarities have no {granularity} granularity: the model was "
                                f"configured without it")
        return part


class AttentionPool(nn.Module):
    """AttFlat from MCAN (one glimpse): softmax over an MLP score per region, weighted sum, projection."""

    def __init__(self, width: int, out_dim: int, dropout: float):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, 1))
        self.merge = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.score(x).squeeze(-1)  # [B,R]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)  # padded regions get weight exactly 0
        weights = scores.softmax(dim=1)  # [B,R]
        pooled = torch.einsum("br,brd->bd", weights, x)  # [B,D]
        return self.merge(pooled)  # [B,J]


def _encoder_stack(config: ModelConfig, layers: int) -> nn.TransformerEncoder:
    """The levels' layers, run by hsl/packed.py on the valid positions only (their weights and state dict
    are nn.TransformerEncoder's)."""
    layer = nn.TransformerEncoderLayer(config.d_model, config.heads, config.ff_dim, config.dropout, batch_first=True)
    check_layer(layer)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def _attended_keys(mask: torch.Tensor) -> torch.Tensor:
    """The keys attention may see (True = attend): the valid ones. A row with nothing valid attends to
    its first position instead of to nothing (which gives NaN); its pooled outputs are zeroed later."""
    attend = mask.clone()  # [B,N]
    attend[:, 0] |= ~mask.any(dim=1)
    return attend


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the valid rows of x [B,N,D] -> [B,D]; zeros where a row has nothing valid."""
    total = x.masked_fill(~mask.unsqueeze(-1), 0.0).sum(dim=1)  # [B,D]
    return total / mask.sum(dim=1, keepdim=True).clamp(min=1)  # [B,D]


def index_parts(config: ModelConfig) -> tuple[bool, bool]:
    """Which parts (mean object vector, image vector) each level contributes to the one stored vector."""
    return config.index_parts()


def joined_dim(config: ModelConfig) -> int:
    """The size of every member's level vectors side by side (before any index_dim projection)."""
    return config.members * config.levels * config.joint_dim * sum(index_parts(config))


def index_dim(config: ModelConfig) -> int:
    """D_idx: the size of index_vectors / query_vectors."""
    return config.index_dim or joined_dim(config)


class HSLModel(nn.Module):
    def __init__(self, config: ModelConfig, image_dim: int, text_dim: int):
        super().__init__()
        self.config, self.image_dim, self.text_dim = config, image_dim, text_dim
        d, j, levels = config.d_model, config.joint_dim, range(config.levels)
        self.use_objects = "object" in config.granularities
        self.use_images = "image" in config.granularities
        self.dropout = nn.Dropout(config.dropout)
        self.image_in = nn.Linear(image_dim, d)
        self.image_levels = nn.ModuleList(_encoder_stack(config, config.image_layers) for _ in levels)
        # The object vectors are also the image vector's input (official code), so they exist in every config.
        self.object_heads = nn.ModuleList(nn.Linear(d, j) for _ in levels)
        self.text_in = nn.Linear(text_dim, d)
        self.text_levels = nn.ModuleList(_encoder_stack(config, config.text_layers) for _ in levels)
        if self.use_objects:
            self.object_query_heads = nn.ModuleList(nn.Linear(d, j) for _ in levels)
        if self.use_images:
            self.pool_inputs = nn.ModuleList(nn.Linear(j, d) for _ in levels)
            self.image_pool = AttentionPool(d, j, config.dropout)  # one AttFlat shared by all levels, as officially
            self.image_query_heads = nn.ModuleList(nn.Linear(d, j) for _ in levels)
        use_fast_dropout(self)  # half the random draws of torch's CPU dropout (hsl/dropout.py)
        self.precision = Precision("fp32", "cpu")
        # After the first member's weights: a one-member config draws exactly the weights it always did.
        if config.members > 1:
            single = replace(config, members=1, index_dim=0)
            self.other_members = nn.ModuleList(HSLModel(single, image_dim, text_dim)
                                               for _ in range(config.members - 1))
        if config.index_dim:  # fitted after training (hsl/projection.py); saved with the weights
            self.register_buffer("index_projection", torch.zeros(joined_dim(config), config.index_dim))

    def use_precision(self, precision: Precision) -> HSLModel:
        """Run the two encoders in `precision` (autocast; weights stay float32). Their outputs, and so
        the similarities, index and query vectors, stay float32: bf16 scores (8 bits of mantissa) would
        tie products that float32 tells apart."""
        self.precision = precision
        for member in self._others():
            member.use_precision(precision)
        return self

    def _others(self) -> list[HSLModel]:
        return list(self.other_members) if self.config.members > 1 else []

    @property
    def exact_by_inner_product(self) -> bool:
        """Whether query_vectors @ index_vectors.T is the exact total score (else: re-rank candidates)."""
        return self.config.exact_by_inner_product

    def encode_image(self, regions: torch.Tensor, region_mask: torch.Tensor) -> ImageEncoding:
        """regions [B,R,Di] float, region_mask [B,R] bool (True = valid) -> per-level object/image vectors."""
        with self.precision.autocast():
            encoding = self._encode_image(regions, region_mask)
        for member in self._others():  # its levels follow: ImageEncoding lists every member's levels
            more = member.encode_image(regions, region_mask)
            encoding.objects += more.objects
            encoding.images += more.images
        return encoding

    def _encode_image(self, regions: torch.Tensor, region_mask: torch.Tensor) -> ImageEncoding:
        mask = region_mask.bool()
        regions = regions.masked_fill(~mask.unsqueeze(-1), 0.0)  # padding values never matter, even NaN
        attend = _attended_keys(mask)  # [B,R]
        hidden = self.image_in(regions)  # [B,R,d]
        objects, images = [], []
        for level, encoder in enumerate(self.image_levels):
            hidden = encoder_on_valid(encoder, hidden, mask, attend)  # [B,R,d]
            raw_objects = self.dropout(self.object_heads[level](hidden))  # [B,R,J]
            objects.append(F.normalize(raw_objects.float(), dim=-1))  # [B,R,J]
            if self.use_images:
                pool_input = self.pool_inputs[level](F.relu(raw_objects))  # [B,R,d]
                images.append(F.normalize(self.image_pool(pool_input, mask).float(), dim=-1))  # [B,J]
        return ImageEncoding(objects, images, mask)

    def encode_text(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> TextEncoding:
        """tokens [B,T,Dt] float, token_mask [B,T] bool (True = valid) -> per-level query vectors."""
        with self.precision.autocast():
            encoding = self._encode_text(tokens, token_mask)
        for member in self._others():
            more = member.encode_text(tokens, token_mask)
            encoding.object_queries += more.object_queries
            encoding.image_queries += more.image_queries
        return encoding

    def _encode_text(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> TextEncoding:
        mask = token_mask.bool()
        attend = _attended_keys(mask)  # [B,T]
        rows = rows_to_compute(mask)  # the valid tokens, and a few padded ones (hsl/packed.py)
        hidden = self.text_in(tokens[rows].masked_fill(~mask[rows].unsqueeze(-1), 0.0))  # [N,d]; padding: 0
        object_queries, image_queries = [], []
        for level, encoder in enumerate(self.text_levels):
            for layer in encoder.layers:
                hidden = packed_layer(layer, hidden, rows, attend)  # [N,d]
            pooled = packed_mean(hidden.float(), rows, mask)  # [B,d] t^l
            if self.use_objects:
                object_queries.append(self._query(self.object_query_heads[level], pooled))  # [B,J]
            if self.use_images:
                image_queries.append(self._query(self.image_query_heads[level], pooled))  # [B,J]
        return TextEncoding(object_queries, image_queries)

    def _query(self, head: nn.Linear, pooled: torch.Tensor) -> torch.Tensor:
        query = self.dropout(head(pooled)).float()  # [B,J]
        return F.normalize(query, dim=-1) if self.config.normalize_query else query

    def object_scores(self, queries: torch.Tensor, objects: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """S_obj for one level: AGG over valid regions of <q1, o_k>; [Bt,J] x [Bi,R,J] -> [Bt,Bi]."""
        if self.config.agg == "mean":  # the mean of inner products is the inner product with the mean
            return queries @ masked_mean(objects, mask).T  # [Bt,Bi]: R times less work than per region
        scores = torch.einsum("tj,irj->tir", queries, objects)  # [Bt,Bi,R]
        valid = mask.unsqueeze(0)  # [1,Bi,R]
        count = valid.sum(dim=-1)  # [1,Bi]
        scores = scores.masked_fill(~valid, float("-inf"))  # [Bt,Bi,R]
        k = 1 if self.config.agg == "max" else min(self.config.topk, scores.shape[-1])
        best = scores.topk(k, dim=-1).values  # [Bt,Bi,k]; -inf where an image has fewer than k regions
        # mean of the best min(k, valid regions), as the official top-k; 0 for an image with no regions
        return best.masked_fill(best.isinf(), 0.0).sum(dim=-1) / count.clamp(min=1, max=k)  # [Bt,Bi]

    def similarities(self, text: TextEncoding, image: ImageEncoding) -> Similarities:
        """The per-level scores of every text against every image, of the configured granularities."""
        objects = images = None
        if self.use_objects:
            pairs = zip(text.object_queries, image.objects, strict=True)
            objects = [self.object_scores(q, o, image.mask) for q, o in pairs]  # [Bt,Bi] each
        if self.use_images:
            images = [q @ v.T for q, v in zip(text.image_queries, image.images, strict=True)]  # [Bt,Bi] each
        scores = Similarities.weighted(self.config.all_level_weights, objects, images)
        if self.config.index_dim:  # what search ranks by, so that hsl eval scores what hsl query serves
            return replace(scores, total=self.query_vectors(text) @ self.index_vectors(image).T)
        return scores

    # Retrieval is one inner product (docs/design.md §2). With agg = mean, S_obj^l = <q1^l, mean_k o_k^l>, so
    # query_vectors(t) @ index_vectors(i).T == similarities(t, i).total exactly. With agg = max | topk
    # the object term is not an inner product: the vectors then hold the image-granularity part only
    # (object-only configs: the mean object vectors), good for gathering candidates that are then
    # re-ranked with `similarities`. `exact_by_inner_product` tells which case holds.
    def _index_parts(self) -> tuple[bool, bool]:
        return index_parts(self.config)

    def index_vectors(self, image: ImageEncoding) -> torch.Tensor:
        """[B,D_idx]: one stored vector per image, levels in order (of every member), [mean O^l, v^l] each."""
        return self._projected(self.joined_vectors(image))

    def joined_vectors(self, image: ImageEncoding) -> torch.Tensor:
        """[B, joined_dim]: index_vectors before any index_dim projection (what hsl/projection.py fits)."""
        object_part, image_part = self._index_parts()
        parts = []
        for level in range(len(self.config.all_level_weights)):
            if object_part:
                parts.append(masked_mean(image.objects[level], image.mask))  # [B,J]
            if image_part:
                parts.append(image.images[level])  # [B,J]
        return torch.cat(parts, dim=1)  # [B,joined_dim]

    def query_vectors(self, text: TextEncoding) -> torch.Tensor:
        """[B,D_idx]: the level weights go on the query side, matching index_vectors' layout."""
        return self._projected(self.joined_queries(text))

    def joined_queries(self, text: TextEncoding) -> torch.Tensor:
        """[B, joined_dim]: query_vectors before any index_dim projection."""
        object_part, image_part = self._index_parts()
        parts = []
        for level, weight in enumerate(self.config.all_level_weights):
            if object_part:
                parts.append(weight * text.object_queries[level])  # [B,J]
            if image_part:
                parts.append(weight * text.image_queries[level])  # [B,J]
        return torch.cat(parts, dim=1)  # [B,joined_dim]

    def _projected(self, joined: torch.Tensor) -> torch.Tensor:
        """The members' vectors side by side, or their index_dim projection (one map for both sides, so the
        inner product is the joined one seen through the fitted principal directions)."""
        return joined @ self.index_projection if self.config.index_dim else joined
