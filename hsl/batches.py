"""The order in which one training epoch visits the products, and how it cuts them into batches.

The in-batch loss learns only the distinctions its negatives ask for. Random batches of 256 catalog
products hold mostly other kinds of product, so the model learns "shoe, not shirt" early and little
after. Hard-negative batches (`group_column`, e.g. articleType) are built from runs of `group_size`
products of one value: every product then meets about `group_size - 1` products of its own kind
(other colour, brand, cut) in each batch, beside the random rest.
"""

from __future__ import annotations

import torch


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, groups: list[str] | None = None,
                  group_size: int = 0) -> list[torch.Tensor]:
    """Index batches covering 0..n-1 once, drawn from `generator` (the same batches for the same seed).

    Without `groups`: a random permutation cut into `batch_size` pieces. With them: each group's
    products, shuffled, cut into runs of `group_size`; the runs shuffled and laid end to end, then cut
    into batches (a batch holds about batch_size / group_size runs)."""
    if not groups or group_size < 2:
        order = torch.randperm(n, generator=generator)
    else:
        members: dict[str, list[int]] = {}
        for i, value in enumerate(groups):
            members.setdefault(value, []).append(i)
        runs: list[torch.Tensor] = []
        for value in sorted(members):  # sorted: the draws do not depend on the store's row order of values
            rows = torch.tensor(members[value])
            rows = rows[torch.randperm(len(rows), generator=generator)]
            runs.extend(rows.split(group_size))
        order = torch.cat([runs[i] for i in torch.randperm(len(runs), generator=generator).tolist()])
    return list(order.split(batch_size))
