"""Device choice, one place for every command: `auto` is the GPU when torch sees one, else the CPU."""

from __future__ import annotations

import torch

from .errors import HSLUsageError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise HSLUsageError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise HSLUsageError(f"device {device!r} asked for, but torch sees no CUDA GPU; use `device` cpu", "device",
                            device)
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise HSLUsageError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s) "
                            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); pick one of them")
    if resolved.type not in ("cpu", "cuda"):  # mps, xla, ...: the library only places tensors on cpu or cuda
        raise HSLUsageError(f"unknown device {device!r}; use auto, cpu or cuda[:N]")
    return resolved
