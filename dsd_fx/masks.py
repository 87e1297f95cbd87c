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


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4); raises ValueError naming the pattern and the fix."""
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"pattern {pattern!r} is not of the form 'N:M' with integers, e.g. '2:4' or '4:8'")
    n, m = (int(p) for p in parts)
    if n < 1 or n >= m:
        raise ValueError(f"pattern {pattern!r} needs 1 <= N < M (N kept of every M); got N={n}, M={m}")
    return n, m


def nm_view(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """`weight` with its reduction dimension last: the axis N:M groups run along."""
    return weight.movedim(dim, -1)


def nm_mask(weight: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Keep the N largest |w| of every M consecutive weights along `dim`; dtype of `weight`.

    A Conv weight (out, in, kh, kw) with dim=1 is grouped along the input channels at each
    kernel position, as if viewed (out, kh, kw, in). Ties keep the lowest index.
    """
    v = nm_view(weight.detach(), dim)
    if v.shape[-1] % m:
        raise ValueError(f"reduction size {v.shape[-1]} is not divisible by m={m}")
    groups = v.abs().reshape(-1, m)
    if m <= 8:
        # rank of each entry in its group: how many entries beat it (larger, or equal at a lower
        # index); m*(m-1) vector comparisons are far cheaper than a sort for small M
        cols = groups.unbind(1)
        keep = []
        for i in range(m):
            rank = torch.zeros_like(cols[i], dtype=torch.uint8)
            for j in range(m):
                if j != i:
                    rank += (cols[j] >= cols[i]) if j < i else (cols[j] > cols[i])
            keep.append(rank < n)
        mask = torch.stack(keep, 1)
    else:
        keep_idx = torch.sort(groups.float(), dim=1, descending=True, stable=True).indices[:, :n]
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep_idx, True)
    return mask.view(v.shape).movedim(-1, dim).to(weight.dtype)
