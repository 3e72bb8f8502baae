"""nn.TransformerEncoderLayer (post-norm, ReLU) run on the valid positions of a padded batch only.

Why: a batch of titles is padded to its longest, and on the catalog only 46% of the title positions
(58% of the shopper texts') are real tokens. Every part of a layer but attention works on each position
alone, so those parts (the input, attention in/out and feed-forward projections: most of the work)
run here on the packed valid rows [N,d]; only attention scatters them back to [B,T,.] to see each
sequence whole. Padded positions never reach a valid output (they are masked as keys, and nothing
reads their own outputs), so the valid outputs are those of the stock layer: the same weights (the
state dict is nn.TransformerEncoder's), the same arithmetic, up to float rounding and other dropout
draws.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import dropout


def packed_layer(layer: nn.TransformerEncoderLayer, x: torch.Tensor, valid: torch.Tensor,
                 attend: torch.Tensor) -> torch.Tensor:
    """One post-norm layer on packed rows x [N,d] (the True positions of valid [B,T], row-major);
    attend [B,T] bool: the keys each sequence attends to (its valid positions, or position 0 of a
    sequence with none). `valid` may hold extra positions (rows_to_compute): computed, never attended."""
    attention = layer.self_attn
    batch, length = valid.shape
    d, heads = x.shape[-1], attention.num_heads
    qkv = F.linear(x, attention.in_proj_weight, attention.in_proj_bias)  # [N,3d]
    grid = qkv.new_zeros(batch, length, 3 * d).index_put((valid,), qkv)  # [B,T,3d]
    q, k, v = grid.view(batch, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # [B,h,T,dh] each
    # Attention written out, not F.scaled_dot_product_attention: its CPU kernel gives a sequence
    # results that depend (in the last bits) on where it sits in the batch, and two copies of a
    # product must score exactly alike (ties rank by position). In float32 whatever the autocast, as
    # that kernel accumulates (bf16 scores and softmax: R@1 0.8 lower on 4 seeds, docs/results.md).
    with torch.autocast(x.device.type, enabled=False):
        q, k, v = q.float(), k.float(), v.float()
        scores = (q @ k.transpose(-1, -2)) * (d // heads) ** -0.5  # [B,h,T,T]
        weights = scores.masked_fill(~attend[:, None, None, :], float("-inf")).softmax(dim=-1)
        if layer.training and attention.dropout:
            weights = dropout(weights, attention.dropout)
        attended = weights @ v  # [B,h,T,dh]
    attended = attended.to(qkv.dtype).transpose(1, 2).reshape(batch, length, d)[valid]  # [N,d]
    x = layer.norm1(x + layer.dropout1(attention.out_proj(attended)))
    inner = layer.dropout(F.relu(layer.linear1(x)))  # [N,ff]
    return layer.norm2(x + layer.dropout2(layer.linear2(inner)))


def check_layer(layer: nn.TransformerEncoderLayer) -> None:
    """packed_layer implements post-norm ReLU layers with a batch-first fused attention: the ones
    hsl/model.py builds. Anything else is a programming error, caught when the model is built."""
    if layer.norm_first or layer.activation_relu_or_gelu != 1 or not layer.self_attn.batch_first \
            or not layer.self_attn._qkv_same_embed_dim:
        raise ValueError("packed_layer needs a post-norm ReLU batch-first layer with a fused in-projection")


def encoder_on_valid(encoder: nn.TransformerEncoder, hidden: torch.Tensor, valid: torch.Tensor,
                     attend: torch.Tensor) -> torch.Tensor:
    """A stack of layers on the valid positions of hidden [B,T,d] (and the few extra of rows_to_compute);
    [B,T,d] back, junk at padded positions."""
    rows = rows_to_compute(valid)
    full = bool(rows.all())  # every position computed (a grid of regions): pack and unpack are views
    x = hidden.reshape(-1, hidden.shape[-1]) if full else hidden[rows]  # [N,d]
    for layer in encoder.layers:
        x = packed_layer(layer, x, rows, attend)
    if full:
        return x.view(*valid.shape, -1)
    return x.new_zeros(*valid.shape, x.shape[-1]).index_put((rows,), x)


def rows_to_compute(valid: torch.Tensor, multiple: int = 256) -> torch.Tensor:
    """valid [B,T] plus the first padded positions that round its count up to a multiple of `multiple`.

    Why: every batch has another count of valid tokens, and tensors of a new size each step fragment the
    C heap: in training, RSS grew from 2.4 to 4.0 GB over 20 epochs of hsl-default. In a few sizes the
    freed blocks are reused. The extra positions are computed like tokens but never attended to (they are
    not keys) nor pooled (packed_mean takes the valid rows only)."""
    missing = int(-int(valid.sum()) % multiple)
    if missing == 0:
        return valid
    rows = valid.flatten().clone()
    rows[(~rows).nonzero()[:missing, 0]] = True  # fewer padded positions than missing: all of them
    return rows.view_as(valid)


def packed_mean(x: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The mean of each sequence's valid rows: x [N,D] packed from the True positions of rows [B,T]
    (a superset of valid [B,T]) -> [B,D]; zeros for a sequence with nothing valid."""
    sequence = rows.nonzero()[:, 0]  # [N] the sequence of each packed row
    kept = valid[rows].unsqueeze(-1).to(x.dtype)  # [N,1] 1 for a valid row, 0 for an extra one
    total = x.new_zeros(valid.shape[0], x.shape[-1]).index_add(0, sequence, x * kept)  # [B,D]
    return total / valid.sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)
