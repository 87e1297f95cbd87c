"""The mask math: pure tensor functions, no graph."""
from __future__ import annotations

from typing import Sequence

import torch


_SORT_BELOW = 1 << 16


def _prune_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A {0,1} bool keep-vector over the flat `scores` that drops exactly the `k` smallest.

    Ties are broken deterministically: among equal magnitudes, the lowest flat index is pruned first.
    """
    n = scores.numel()
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return keep
    if k >= n:
        return ~keep
    if n <= _SORT_BELOW:  # a stable sort is fewer ops for small tensors
        keep[torch.argsort(scores, stable=True)[:k]] = False
        return keep
    threshold = torch.kthvalue(scores, k).values
    below = scores < threshold
    tied = scores == threshold
    need = k - int(below.sum())
    # prune the first `need` tied entries, in index order
    tied_pruned = tied & (torch.cumsum(tied.to(torch.int64), 0) <= need)
    keep &= ~(below | tied_pruned)
    return keep


def n_pruned(numel: int, sparsity: float) -> int:
    """How many of `numel` weights a layer at `sparsity` prunes: round(sparsity * numel)."""
    return int(round(sparsity * numel))


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """DSD's mask: keep the largest |w|, prune exactly round(sparsity * numel); dtype of `weight`."""
    scores = weight.detach().abs().flatten().to(torch.float32)
    keep = _prune_smallest(scores, n_pruned(weight.numel(), sparsity))
    return keep.view(weight.shape).to(weight.dtype)


def global_magnitude_masks(weights: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """One magnitude ranking over all `weights` together; prunes round(sparsity * total) weights."""
    if not weights:
        return []
    device = weights[0].device
    scores = torch.cat([w.detach().abs().flatten().to(device=device, dtype=torch.float32) for w in weights])
    keep = _prune_smallest(scores, n_pruned(scores.numel(), sparsity))
    out, start = [], 0
    for w in weights:
        out.append(keep[start : start + w.numel()].view(w.shape).to(device=w.device, dtype=w.dtype))
        start += w.numel()
    return out
