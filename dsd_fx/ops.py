"""The ops that dsd_fx's graphs call: one node per masked weight."""
from __future__ import annotations

import torch


class _MaskMul(torch.autograd.Function):
    """Eager fast path of W * M: re-zero W's pruned entries in place, return W, mask the gradient.

    A plain `torch.mul(W, M)` allocates and writes a weight-sized tensor in the forward and again
    in the backward; on a CPU MLP step that is ~18% over dense (benchmarks/overhead.py). Here the
    forward writes zeros into pruned positions (a no-op while the S phase holds, since they are
    already zero) through `.data`, so tensors saved for backward are not invalidated, and returns a
    view of W, which equals W * M exactly. The backward is `grad * M`.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weight.data.mul_(mask)
        ctx.save_for_backward(mask)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.fx._symbolic_trace.is_fx_tracing()


def mask_mul(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """W * M, in value and in gradient; the mask multiplication of a sparse-phase graph.

    As a side effect it keeps the pruned entries of W at zero in storage (DSD: pruned weights stay
    zero throughout the S phase), so optimizer state from before the S phase cannot revive them.
    Under torch.compile, torch.export and fx tracing it is the plain `weight * mask`.
    """
    if _tracing() or isinstance(weight, torch._subclasses.FakeTensor) or not isinstance(weight, torch.nn.Parameter):
        return torch.mul(weight, mask)
    return _MaskMul.apply(weight, mask)


torch.fx.wrap("mask_mul")
