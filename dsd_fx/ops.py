"""The ops that dsd_fx's graphs call: one node per masked weight."""
from __future__ import annotations

import torch


class _MaskMul(torch.autograd.Function):
    """Eager fast path of W * M: re-zero W's pruned entries in place, return W, mask the gradient.

    A plain `torch.mul(W, M)` allocates and writes a weight-sized tensor in the forward and again
    in the backward. Here the forward writes zeros into pruned positions (a no-op while the S
    phase holds, since they are already zero) through `.data`, so tensors saved for backward are
    not invalidated, and returns a view of W, which equals W * M exactly. The backward is
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


_fx_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing)


def _tracing() -> bool:
    return torch.compiler.is_compiling() or _fx_tracing()


def mask_mul(weight: torch.Tensor, mask: torch.Tensor, grad_inplace: bool = False) -> torch.Tensor:
    """W * M, in value and in gradient; the mask multiplication of a sparse-phase graph.

    `grad_inplace=True` masks the incoming gradient in place; the rewrite sets it only where the
    result feeds exactly one matmul-like op (linear, conv, matmul, mm, addmm), whose weight
    gradient is a fresh tensor that nothing else holds.

    As a side effect it keeps the pruned entries of W at zero in storage (DSD: pruned weights stay
    zero throughout the S phase), so optimizer state from before the S phase cannot revive them.
    Under torch.compile and torch.export it is the plain `weight * mask`; an fx tracer (one that
    re-traces the generated code, as torch.load of a GraphModule does) records it as one node.
    """
    if isinstance(weight, torch.fx.Proxy):  # fx tracing (symbolic_trace, torch.load's re-trace): one node
        return weight.tracer.create_proxy("call_function", mask_mul, (weight, mask), {"grad_inplace": grad_inplace} if grad_inplace else {})
    if _tracing() or isinstance(weight, torch._subclasses.FakeTensor) or not isinstance(weight, torch.nn.Parameter):
        return torch.mul(weight, mask)
    return _MaskMul.apply(weight, mask, grad_inplace)


def module_call(module: torch.nn.Module, names: tuple, weights: tuple, args: tuple, kwargs: dict):
    """`module(*args, **kwargs)` with its parameters `names` replaced by the tensors `weights`.

    The functional call of a layer whose inside the graph does not see (nn.LSTM, nn.GRU,
    nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.Embedding, ...): the S-phase graph feeds
    it the masked weights, and re-dense turns it back into the plain module call. It is
    `torch.func.functional_call`, so the layer's own forward runs: the same kernels, the same
    ONNX op after re-dense. An fx tracer records it as one node (the layer as a get_attr).
    """
    proxy = next((w for w in weights if isinstance(w, torch.fx.Proxy)), None)  # the masked weights, when fx traces
    if proxy is not None:
        return proxy.tracer.create_proxy("call_function", module_call, (module, names, weights, args, kwargs), {})
    return torch.func.functional_call(module, dict(zip(names, weights)), tuple(args), dict(kwargs))




# ---------------------------------------------------------------- SR-STE


@torch.library.custom_op("dsd_fx::sparsify_nm", mutates_args=())
def sparsify_nm(weight: torch.Tensor, n: int, m: int, dim: int, lambda_w: float) -> torch.Tensor:
    """W * nm_mask(W): the N:M mask recomputed from the dense weight at every call (SR-STE's forward)."""
    from dsd_fx.masks import nm_sparsify

    return nm_sparsify(weight, n, m, dim)


@sparsify_nm.register_fake
def _(weight, n, m, dim, lambda_w):
    return torch.empty_like(weight)


def _sparsify_nm_setup(ctx, inputs, output):
    weight, n, m, dim, lambda_w = inputs
    ctx.lambda_w = lambda_w
    if lambda_w:
        ctx.save_for_backward(weight, output)


def _sparsify_nm_backward(ctx, grad):
    """STE: the gradient of W~ goes to W unmasked; SR-STE adds lambda_W * (1 - M) * W.

    (1 - M) * W = W - W * M = W - output: no mask to recompute, and the output is saved anyway
    by the matmul that consumes it. One weight-sized allocation, bitwise equal to
    `grad + lambda_w * (weight - output)`: W - output is exact (0 or W), and + and * commute.
    """
    if not ctx.lambda_w:
        return grad, None, None, None, None
    weight, output = ctx.saved_tensors
    return torch.sub(weight, output).mul_(ctx.lambda_w).add_(grad), None, None, None, None


sparsify_nm.register_autograd(_sparsify_nm_backward, setup_context=_sparsify_nm_setup)


# ---------------------------------------------------------------- packed N:M


def _semi_structured_ok(x: torch.Tensor, out_features: int, in_features: int, n: int, m: int) -> bool:
    return (
        x.is_cuda
        and (n, m) == (2, 4)
        and x.dtype in (torch.float16, torch.bfloat16)
        and out_features % 64 == 0
        and in_features % 64 == 0
        and x.numel() // x.shape[-1] % 8 == 0
    )


_LOGGED: set = set()
_REORDER: dict = {}


def _kernel() -> str:
    import os

    return os.environ.get("DSD_FX_NM_KERNEL", "semi-structured")


def cutlass_weight(values: torch.Tensor, meta: torch.Tensor, out_features: int, in_features: int):
    """Our packed 2:4 weight as torch's CUTLASS semi-structured tensor, with no dense round trip.

    CUTLASS keeps, per group of 4, the two kept values in index order (our `values`) and a 4-bit
    code `i0 | i1 << 2` per group, four groups per int16: exactly our little-endian 2-bit index
    stream read as int16. Only CUTLASS's reordering of the metadata words remains to be done.
    """
    from torch.sparse import SparseSemiStructuredTensorCUTLASS
    from torch.sparse._semi_structured_conversions import _calculate_meta_reordering_scatter_offsets

    ncols = in_features // 16
    key = (out_features, ncols, values.device)
    if key not in _REORDER:
        _REORDER[key] = _calculate_meta_reordering_scatter_offsets(out_features, ncols, torch.int16, values.device)
    words = meta[: out_features * ncols * 2].view(torch.int16)
    reordered = torch.empty_like(words).scatter_(0, _REORDER[key], words).view(out_features, ncols)
    return SparseSemiStructuredTensorCUTLASS(
        torch.Size((out_features, in_features)), packed=values.detach().contiguous(), meta=reordered,
        packed_t=None, meta_t=None, compressed_swizzled_bitmask=None,
    )
# how often nm_linear ran on torch's semi-structured 2:4 kernels (tests and benchmarks read it)
SEMI_STRUCTURED_CALLS = [0]


@torch.library.custom_op("dsd_fx::nm_linear", mutates_args=())
def nm_linear(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None, n: int, m: int
) -> torch.Tensor:
    """x @ W.T + bias, with W (out, in) stored N:M-packed as (values (out, in*N/M), meta).

    CUDA, 2:4, fp16/bf16, shapes multiples of 64: torch's semi-structured sparse kernels; on
    compute capability 8.x CUTLASS, fed our packed storage directly (see cutlass_weight), elsewhere
    cuSPARSELt, compressing the unpacked weight on every call. `DSD_FX_NM_KERNEL=dense` skips them.
    Otherwise our kernel, which scatters W for a dense product and frees it.
    """
    from dsd_fx.packing import unpack_nm

    out_features, in_features = values.shape[0], values.shape[1] * m // n
    if _semi_structured_ok(x, out_features, in_features, n, m) and values.dtype == x.dtype and _kernel() != "dense":
        try:
            if torch.cuda.get_device_capability(x.device)[0] == 8:  # torch's CUTLASS 2:4 kernels are sm8x-only
                sparse = cutlass_weight(values, meta, out_features, in_features)
            else:  # cuSPARSELt: compress from dense (values change every training step)
                from torch.sparse import to_sparse_semi_structured

                sparse = to_sparse_semi_structured(unpack_nm(values, meta, n, m))
            y = torch.nn.functional.linear(x, sparse)
            SEMI_STRUCTURED_CALLS[0] += 1
            return y if bias is None else y + bias
        except Exception as err:  # noqa: BLE001 - fall back, once logged
            key = ((out_features, in_features), x.dtype, type(err).__name__)
            if key not in _LOGGED:
                _LOGGED.add(key)
                import logging

                logging.getLogger(__name__).info("semi-structured 2:4 kernel unavailable for %s: %s; using dense fallback", key, err)
    weight = unpack_nm(values, meta, n, m)
    if bias is not None and bias.dim() != 1:  # addmm's broadcast bias
        return torch.nn.functional.linear(x, weight) + bias
    return torch.nn.functional.linear(x, weight, bias)


@nm_linear.register_fake
def _(x, values, meta, bias, n, m):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _nm_linear_setup(ctx, inputs, output):
    x, values, meta, bias, n, m = inputs
    ctx.save_for_backward(x, values, meta)
    ctx.nm = (n, m, bias is not None)
    ctx.bias_shape = None if bias is None else bias.shape


def _nm_linear_backward(ctx, grad):
    from dsd_fx.packing import gather_nm, unpack_nm

    x, values, meta = ctx.saved_tensors
    n, m, has_bias = ctx.nm
    weight = unpack_nm(values, meta, n, m)  # rebuilt for the backward only; nothing dense is kept
    g2 = grad.reshape(-1, grad.shape[-1])
    grad_x = (grad @ weight) if ctx.needs_input_grad[0] else None
    grad_values = None
    if ctx.needs_input_grad[1]:
        grad_w = g2.t() @ x.reshape(-1, x.shape[-1])
        grad_values = gather_nm(grad_w, meta, n, m, values.shape)
    grad_bias = None
    if has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.sum_to_size(ctx.bias_shape)
    return grad_x, grad_values, None, grad_bias, None, None


nm_linear.register_autograd(_nm_linear_backward, setup_context=_nm_linear_setup)


def _autocast_like_linear(opname: str) -> None:
    """Under torch.autocast, cast the op's floating inputs to the autocast dtype, as F.linear does
    (torch.library.register_autocast fixes one dtype; this follows the active one: fp16 or bf16)."""
    lib = torch.library.Library("dsd_fx", "IMPL")
    _AUTOCAST_LIBS.append(lib)
    op = getattr(torch.ops.dsd_fx, opname).default
    for device in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, device=device, excluded=excluded):
            dtype = torch.get_autocast_dtype(device)
            cast = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                return op(*cast)

        lib.impl(opname, kernel, key, with_keyset=True)


_AUTOCAST_LIBS: list = []
_autocast_like_linear("nm_linear")


@torch.library.custom_op("dsd_fx::nm_unpack", mutates_args=())
def nm_unpack(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, dim: int, shape: list[int]) -> torch.Tensor:
    """The dense weight from packed N:M storage, for ops with no packed kernel (Conv): compute is dense."""
    from dsd_fx.packing import unpack_nm

    return unpack_nm(values, meta, n, m, dim).reshape(shape).contiguous()


@nm_unpack.register_fake
def _(values, meta, n, m, dim, shape):
    return values.new_empty(shape)


def _nm_unpack_setup(ctx, inputs, output):
    values, meta, n, m, dim, shape = inputs
    ctx.save_for_backward(meta)
    ctx.nm = (n, m, dim, tuple(values.shape))


def _nm_unpack_backward(ctx, grad):
    from dsd_fx.masks import nm_view
    from dsd_fx.packing import gather_nm

    (meta,) = ctx.saved_tensors
    n, m, dim, vshape = ctx.nm
    return gather_nm(nm_view(grad, dim), meta, n, m, vshape), None, None, None, None, None


nm_unpack.register_autograd(_nm_unpack_backward, setup_context=_nm_unpack_setup)
