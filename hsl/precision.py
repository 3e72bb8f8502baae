"""Numeric precision and memory layout of the forward passes: one resolver shared by every command.

`auto` picks what measured fastest (docs/benchmarks.md): bfloat16 autocast on CPUs with native
bf16 instructions (AVX512-BF16 or AMX) — on a 2-core EPYC the two backbones run 2.4x faster than
in float32 — and float32 everywhere else: on other CPUs bf16 is emulated and slower, and on an H200
the backbones' bare forward ran 6,900 images/s in float32 (convolutions on TF32 tensor cores) against
2,300 under bf16 or fp16 autocast (EfficientNet-Lite0's depthwise convolutions and the casts around
them), and a 10-epoch training of hsl-default is faster in float32 too (bf16's steady epochs are
1.2x faster, but its first pays ~6 s more). Autocast keeps the weights (and training's master copy)
in float32 and runs matrix products and convolutions in the low precision, so outputs, stored
features and saved weights keep their dtypes. channels_last (NHWC) is the image tower's layout on
every device, once its BatchNorms are folded into the convolutions (hsl/backbones.py): on the 2-core
EPYC the tower then ran 1.5-1.8x faster than in NCHW in float32 and in bf16, and on the H200 NHWC
was never slower (3.8x faster under bf16).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from .errors import HSLUsageError

if TYPE_CHECKING:
    import torch

# torch is imported only where a forward pass needs it: a cold `hsl query` resolves its precision
# (to know whether the cached index fits) without paying torch's 1.5 s import.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16: what the forward passes compute in
    device_type: str  # cpu | cuda | ...: autocast is per device type
    channels_last: bool = False  # image tower layout (NHWC)

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "nchw"

    @property
    def needs_grad_scaling(self) -> bool:
        """float16 gradients underflow without loss scaling; bfloat16 has float32's range."""
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the forward passes run in: a no-op in float32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        import torch

        return torch.autocast(self.device_type, dtype=self.dtype)


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX tiles)."""
    try:  # Linux: the kernel lists the same CPUID bits torch checks, without importing torch
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), None)
    except OSError:
        flags = None
    if flags is not None:
        return bool({"avx512_bf16", "amx_tile"} & set(flags))
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def resolve_precision(requested: str, device: torch.device | str) -> Precision:
    """`auto` | `fp32` | `bf16` | `fp16` on `device` -> the Precision the forward passes use."""
    if requested not in PRECISIONS:
        raise HSLUsageError(f"unknown precision {requested!r}; use {', '.join(PRECISIONS)}")
    device_type = getattr(device, "type", None) or str(device).split(":")[0]  # torch.device or "cuda:1"
    name = requested if requested != "auto" else auto_precision(device_type)
    # NHWC: oneDNN's and cuDNN's fast convolution kernels take it without reordering (module docstring)
    return Precision(name, device_type, channels_last=True)


def auto_precision(device_type: str) -> str:
    """The fastest precision measured for a device type (see the module docstring)."""
    if device_type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"
