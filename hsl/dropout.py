"""Dropout whose random mask is cheap on the CPU.

torch's CPU dropout draws one 32-bit number per element from its mt19937 generator, one thread; on
a 2-core machine that was 31% of an epoch of hsl-default in bf16 (5.3 of 17 s, cProfile). Here the
bits come from numpy's PCG64 (about 4x faster per bit than torch's CPU generator), 16 of them per
element, so p is rounded to a multiple of 1/65536 (0.1 -> 0.100006) and the kept values are scaled
by 1 / (1 - p') of that rounded p' (in the input's dtype: within 0.2% in bf16). Each call seeds its
PCG64 from torch's generator, so torch's RNG state stays the one source of randomness: a seeded run,
and a run resumed from a checkpoint, draw the same masks. The mask is built in the input's dtype
(values 0 and the scale) and applied by one product, which the backward pass reuses. On CUDA torch's
fused kernel is faster and is used as is.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16


class Dropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p) if self.training else x

    def extra_repr(self) -> str:
        return f"p={self.p}"


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-time dropout of x with probability p (rounded as above on the CPU)."""
    dropped = round(p * _LEVELS)  # of every 65,536 values, this many are zeroed on average
    if dropped == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    keep = random_int16(x.numel()).view(x.shape) >= dropped - _LEVELS // 2  # P(drop) = dropped/65536
    # 0 or the scale, in x's dtype; through uint8 because torch converts bool to float unvectorised (4x slower)
    mask = keep.view(torch.uint8).to(x.dtype).mul_(_LEVELS / (_LEVELS - dropped))
    return x * mask


def random_int16(n: int) -> torch.Tensor:
    """n uniform int16 values from a PCG64 seeded by one draw of torch's (global) generator."""
    seed = int(torch.randint(0, 1 << 62, (1,)))
    words = np.random.PCG64(seed).random_raw((n + 3) // 4)  # uint64: four int16 values each
    return torch.from_numpy(words.view(np.int16)[:n])


def use_fast_dropout(module: nn.Module) -> nn.Module:
    """Replace every nn.Dropout inside `module` (also those of nn.TransformerEncoderLayer) by `Dropout`.

    Dropout holds no weights, so state dicts and checkpoints are unchanged."""
    for name, child in module.named_children():
        if isinstance(child, nn.Dropout):
            setattr(module, name, Dropout(child.p))
        else:
            use_fast_dropout(child)
    return module
