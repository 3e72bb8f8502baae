"""Token masks from title lengths, one rule for training, evaluation and search."""

from __future__ import annotations

import torch


def token_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[n, width] bool, True on each title's first `lengths[i]` tokens. An empty title (length 0) keeps
    one zero token: attention and masked means never see a row with nothing in it."""
    positions = torch.arange(width, device=lengths.device)  # [T]
    return positions[None] < lengths.clamp(min=1)[:, None]  # [n,T]
