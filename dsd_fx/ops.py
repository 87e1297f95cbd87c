"""The ops that dsd_fx's graphs call: one node per masked weight."""
from __future__ import annotations

import torch


class _MaskMul(torch.autograd.Function):
    """Eager fast path of W * M: re-zero W's pruned entries in place, return W, mask the gradient.

    A plain `torch.mul(W, M)` allocates and writes a weight-sized tensor in the forward and again
    in the backward; on a CPU MLP step that costs ~18% over dense (benchmarks/overhead.py), most
    of it in fresh allocations. Here the forward writes zeros into pruned positions (a no-op while
    the S phase holds, since they are already zero) through `.data`, so tensors saved for backward
    are not invalidated, and returns a view of W, which equals W * M exactly. The backward is
    `grad * M`, computed in place when the rewrite knows the incoming gradient is not shared.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, grad_inplace: bool) -> torch.Tensor:
        weight.data.mul_(mask)
        ctx.save_for_backward(mask)
        ctx.grad_inplace = grad_inplace
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        if ctx.grad_inplace and not grad.requires_grad:
            return grad.mul_(mask), None, None
        return grad * mask, None, None


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.fx._symbolic_trace.is_fx_tracing()


def mask_mul(weight: torch.Tensor, mask: torch.Tensor, grad_inplace: bool = False) -> torch.Tensor:
    """W * M, in value and in gradient; the mask multiplication of a sparse-phase graph.

    `grad_inplace=True` masks the incoming gradient in place; the rewrite sets it only where the
    result feeds exactly one matmul-like op (linear, conv, matmul, mm, addmm), whose weight
    gradient is a fresh tensor that nothing else holds.

    As a side effect it keeps the pruned entries of W at zero in storage (DSD: pruned weights stay
    zero throughout the S phase), so optimizer state from before the S phase cannot revive them.
    Under torch.compile, torch.export and fx tracing it is the plain `weight * mask`.
    """
    if _tracing() or isinstance(weight, torch._subclasses.FakeTensor) or not isinstance(weight, torch.nn.Parameter):
        return torch.mul(weight, mask)
    return _MaskMul.apply(weight, mask, grad_inplace)


torch.fx.wrap("mask_mul")
