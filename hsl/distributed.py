"""torch.distributed as launched by `torchrun`: which process this is, and the few collectives hsl needs.

hsl never starts processes itself: `torchrun --nproc-per-node N hsl extract|train ...` (or across
nodes with torchrun's usual rendezvous flags) sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR, and
`init()` joins the group. Without those variables everything here is a no-op for one process, so the
same code path serves a laptop and a cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import HSLUsageError


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise HSLUsageError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun") from None


def from_env() -> Rank:
    """This process's place in the job, from torchrun's variables (one process when they are absent)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise HSLUsageError(f"RANK={rank} does not fit WORLD_SIZE={world}; launch with torchrun")
    return Rank(rank, world, _env_int("LOCAL_RANK", 0))


def init(device: torch.device | None = None, timeout: timedelta | None = None) -> Rank:
    """Join the process group when launched by torchrun: nccl for CUDA devices, gloo otherwise.

    `timeout` bounds each collective (torch's default: 30 minutes for gloo)."""
    me = from_env()
    if me.distributed and not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timeout)
    return me


def gather_objects(value: Any, me: Rank) -> list[Any]:
    """Every rank's picklable `value`, in rank order, on every rank (also a barrier)."""
    if not me.distributed:
        return [value]
    values: list[Any] = [None] * me.world
    dist.all_gather_object(values, value)
    return values


def scatter_objects(values: list[Any] | None, me: Rank) -> Any:
    """Rank 0's values[r] on rank r (the other ranks pass None); each rank receives only its own."""
    if not me.distributed:
        return values[0] if values else None
    received: list[Any] = [None]
    dist.scatter_object_list(received, values if me.is_main else None, src=0)
    return received[0]


def finish() -> None:
    """Leave the process group (torch warns at exit about a group left open)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def share(n: int, me: Rank) -> range:
    """The contiguous part [start, stop) of n items that rank `me.rank` of `me.world` takes."""
    base, extra = divmod(n, me.world)
    start = me.rank * base + min(me.rank, extra)
    return range(start, start + base + (1 if me.rank < extra else 0))


def all_gather_rows(tensor: torch.Tensor, me: Rank) -> torch.Tensor:
    """Concatenate every rank's [n_r, ...] rows in rank order, differentiably.

    Gradients flow back to each rank's own rows (torch.distributed.nn sums the incoming gradients of
    every rank's copy of the loss). Ranks may hold different row counts (the last, short batch): rows
    are padded to the largest count for the collective and the padding is cut off again."""
    if not me.distributed:
        return tensor
    from torch.distributed.nn.functional import all_gather

    counts = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(counts) for _ in range(me.world)]
    dist.all_gather(sizes, counts)
    sizes = [int(s.item()) for s in sizes]
    pad = max(sizes) - tensor.shape[0]
    if pad:
        tensor = torch.cat([tensor, tensor.new_zeros((pad, *tensor.shape[1:]))])
    parts = all_gather(tensor)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])
