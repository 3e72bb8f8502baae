"""Top-k with one tie rule everywhere: best first, equal scores in position (store) order.

torch.topk and np.argpartition leave the order of equal scores unspecified, so a tie could rank
differently from one run, machine or library version to the next; these never do. numpy only:
the index's query path stays free of torch.
"""

from __future__ import annotations

import numpy as np


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """[min(k, n)] int64 positions of the k highest of the 1-D `scores`, best first, ties by position."""
    n = len(scores)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, np.int64)
    if k < n:  # every score at least the k-th highest: ties across the cut are settled by position below
        candidates = np.flatnonzero(scores >= np.partition(scores, n - k)[n - k])
    else:
        candidates = np.arange(n)
    return candidates[np.lexsort((candidates, -scores[candidates]))][:k].astype(np.int64)


def top_k_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """[Q, min(k, N)] positions of each row's k highest of [Q, N] `scores` (`top_k` per row)."""
    return np.stack([top_k(row, k) for row in scores]) if len(scores) else np.zeros((0, min(k, scores.shape[1])),
                                                                                   np.int64)
