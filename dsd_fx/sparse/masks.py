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


_PAIRWISE_MAX_M = 8  # above this, m*(m-1)/2 comparisons cost more than a sort


def _pairwise_ranks(magnitudes: torch.Tensor) -> torch.Tensor:
    """(groups, M) -> (M, groups) int8: how many entries of its row beat each entry.

    j beats k when |w_j| > |w_k|, or when they tie and j < k. Each unordered pair (i < j) is
    compared once, c = |w_j| > |w_i|: j beats i when c, i beats j otherwise. So the rank of k is
    k - sum_{i<k} c_ik + sum_{j>k} c_kj: it starts at k (as if every lower index beat it).
    """
    groups, m = magnitudes.shape
    cols = magnitudes.unbind(1)
    ranks = torch.arange(m, dtype=torch.int8, device=magnitudes.device).unsqueeze(1).repeat(1, groups)
    beats = torch.empty(groups, dtype=torch.bool, device=magnitudes.device)
    for i in range(m):
        for j in range(i + 1, m):
            c = torch.gt(cols[j], cols[i], out=beats).view(torch.int8)  # 1: j beats i; 0: i beats j
            ranks[i].add_(c)
            ranks[j].sub_(c)
    return ranks


def _keep_into(out: torch.Tensor, magnitudes: torch.Tensor, n: int) -> torch.Tensor:
    """Write the keep mask of (groups, M) `magnitudes` into the (groups, M) `out` (any dtype)."""
    m = magnitudes.shape[1]
    if m > _PAIRWISE_MAX_M:
        keep_idx = torch.sort(magnitudes.float(), dim=1, descending=True, stable=True).indices[:, :n]
        return out.zero_().scatter_(1, keep_idx, 1)
    ranks = _pairwise_ranks(magnitudes)  # fully computed before `out` is written: it may hold `magnitudes`
    if torch.compiler.is_compiling():  # dynamo refuses a strided out=; inductor fuses this anyway
        return out.copy_((ranks < n).t())
    for k in range(m):  # eager: one comparison per column, written in place, no (groups, M) temporary
        torch.lt(ranks[k], n, out=out[:, k])
    return out


def nm_keep(magnitudes: torch.Tensor, n: int) -> torch.Tensor:
    """(groups, M) magnitudes -> (groups, M) bool: the N largest of each row, ties to the lowest index.

    For M <= 8, ranks from pairwise comparisons inside each group: M*(M-1)/2 vectorised
    comparisons on the columns, in-place int8 sums and one comparison per column, no sort and no
    weight-sized temporary (see _pairwise_ranks). torch.compile traces it without a break. Larger
    M: a stable sort. Every input without NaN gets the mask the former per-entry code gave
    (tests/test_masks.py proves it against a copy of that code); with NaN the mask is unspecified.
    """
    return _keep_into(torch.empty_like(magnitudes, dtype=torch.bool), magnitudes, n)


def _nm_groups(weight: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    """The reduction-last view of `weight`, contiguous, checked divisible by m."""
    v = nm_view(weight.detach(), dim)
    if v.shape[-1] % m:
        raise ValueError(f"reduction size {v.shape[-1]} is not divisible by m={m}")
    return v.contiguous()


def nm_mask(weight: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Keep the N largest |w| of every M consecutive weights along `dim`; dtype of `weight`.

    A Conv weight (out, in, kh, kw) with dim=1 is grouped along the input channels at each
    kernel position, as if viewed (out, kh, kw, in). Ties keep the lowest index.
    """
    v = _nm_groups(weight, m, dim)
    keep = nm_keep(v.abs().view(-1, m), n)
    return keep.view(v.shape).movedim(-1, dim).to(weight.dtype)


def nm_sparsify(weight: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """W * nm_mask(W), bitwise, in the layout of `weight`, with no weight-sized temporary.

    The result's storage holds |W| (what the ranking reads), then the mask (0 or 1 in W's dtype),
    then mask * W, each written in place: one weight-sized allocation where
    `weight * nm_mask(weight)` makes four (|W|, the stacked bool mask, the mask in W's dtype,
    the product). SR-STE computes it at every forward.
    """
    v = _nm_groups(weight, m, dim)
    out = torch.abs(v)
    groups = out.view(-1, m)
    _keep_into(groups, groups, n).mul_(v.view(-1, m))
    if dim % weight.dim() == weight.dim() - 1 and weight.is_contiguous():
        return out  # not a view: its storage is its own (sparsify_nm's backward may reuse it)
    if weight.is_contiguous() and nm_view(weight, dim).is_contiguous():
        return out.movedim(-1, dim)
    result = torch.empty_like(weight)
    nm_view(result, dim).copy_(out)
    return result
