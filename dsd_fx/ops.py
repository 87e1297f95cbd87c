"""The ops that dsd_fx's graphs call: one node per masked weight."""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from dsd_fx.sparse.config import KERNELS
from dsd_fx.sparse.packing import CompressedWeights, compress_semi_structured

log = logging.getLogger(__name__)


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
def sparsify_nm(
    weight: torch.Tensor, n: int, m: int, dim: int, lambda_w: float, reuse_output: bool = False
) -> torch.Tensor:
    """W * nm_mask(W): the N:M mask recomputed from the dense weight at every call (SR-STE's forward).

    `reuse_output=True` lets the backward write W's gradient into the storage of this op's output
    W~ (no weight-sized allocation per step); the rewrite sets it only where W~ feeds exactly one
    matmul-like op and nothing else, so that nothing reads W~ after that op's backward.
    """
    from dsd_fx.sparse.masks import nm_sparsify

    return nm_sparsify(weight, n, m, dim)


@sparsify_nm.register_fake
def _(weight, n, m, dim, lambda_w, reuse_output=False):
    return torch.empty_like(weight)


def _sparsify_nm_setup(ctx, inputs, output):
    weight, n, m, dim, lambda_w, reuse_output = inputs
    ctx.lambda_w = lambda_w
    ctx.reuse_output = reuse_output
    if lambda_w:
        ctx.save_for_backward(weight, output)


def _sparsify_nm_backward(ctx, grad):
    """STE: the gradient of W~ goes to W unmasked; SR-STE adds lambda_W * (1 - M) * W.

    (1 - M) * W = W - W * M = W - output: no mask to recompute, and the output is saved anyway
    by the matmul that consumes it. Bit for bit `grad + lambda_w * (weight - output)`, as before:
    W - output and output - W are exact (0 or -+W), and + and * commute (the reuse_output path can
    differ only in the sign of a zero).

    With reuse_output (W~ feeds one matmul-like op, nothing else), the result is written into W~'s
    own storage: this node runs after that op's backward, and with neither retain_graph nor
    create_graph no later backward unpacks W~ (one that did would fail the version check, not
    read a wrong value). That saves a weight-sized allocation per weight and step, and the page
    faults that fresh memory costs. Otherwise (or when traced by torch.compile), a new tensor.
    """
    none = (None,) * 5
    if not ctx.lambda_w:
        return grad, *none
    weight, output = ctx.saved_tensors
    if ctx.reuse_output and _may_overwrite(output, grad):
        return output.sub_(weight).mul_(-ctx.lambda_w).add_(grad), *none
    return torch.sub(weight, output).mul_(ctx.lambda_w).add_(grad), *none


_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _may_overwrite(saved: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether a backward may reuse the storage of a tensor it saved (see _sparsify_nm_backward)."""
    return (
        _keep_graph is not None
        and not torch.is_grad_enabled()  # create_graph=False
        and not _keep_graph()  # retain_graph=False
        and type(saved) is torch.Tensor  # not traced (FakeTensor, FunctionalTensor, ...)
        and type(grad) is torch.Tensor
        and saved.shape == grad.shape
        and saved.dtype == grad.dtype
        and not saved._is_view()
    )


sparsify_nm.register_autograd(_sparsify_nm_backward, setup_context=_sparsify_nm_setup)


# ---------------------------------------------------------------- packed N:M




SEMI_STRUCTURED = CompressedWeights(compress_semi_structured)  # every packed 2:4 weight nm_linear ran sparse
_FASTER: dict[tuple, bool] = {}  # (out, in, rows, dtype, device) -> the sparse kernel beat dense, measured once
_UNAVAILABLE: set = set()  # keys whose sparse kernel raised: never retried
_LOGGED: set = set()


def _log_once(key: tuple, message: str, *args) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info(message, *args)


def _semi_structured_ok(x: torch.Tensor, values: torch.Tensor, n: int, m: int) -> str | None:
    """Why torch's semi-structured 2:4 kernels cannot take this call, or None when they can."""
    out_features, in_features = values.shape[0], values.shape[1] * m // n
    if not x.is_cuda:
        return "they need CUDA"
    if (n, m) != (2, 4):
        return f"they need 2:4, not {n}:{m}"
    if x.dtype not in (torch.float16, torch.bfloat16) or values.dtype != x.dtype:
        return f"they need fp16 or bf16 for x and the values alike (x {x.dtype}, values {values.dtype})"
    if out_features % 64 or in_features % 64:
        return f"they need out and in features multiples of 64 (got {out_features}, {in_features})"
    if (x.numel() // x.shape[-1]) % 8:
        return "they need the token count a multiple of 8"
    return None


def _time_ms(fn: Callable[[], Any], repeats: int = 5) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def _sparse_forms(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, n: int, m: int, kernel: str):
    """The semi-structured forms nm_linear computes with, or None for the dense kernel.

    "dense": never. "sparse": whenever the kernels can take the call. "auto": when they can and,
    measured once per shape, dtype and device (forward product, CUDA events), beat the dense one.
    Every fallback to dense is logged once per shape and reason.
    """
    if kernel == "dense":
        return None
    rows = x.numel() // x.shape[-1]
    shape = (values.shape[0], values.shape[1] * m // n)
    why = _semi_structured_ok(x, values, n, m)
    if why is not None:
        _log_once((shape, x.dtype, x.device.type, why), "dsd_fx::nm_linear %s %s on %s: dense kernel (semi-structured 2:4 kernels: %s)",
                  shape, x.dtype, x.device.type, why)
        return None
    key = (*shape, rows, x.dtype, x.device)
    if key in _UNAVAILABLE or (kernel == "auto" and _FASTER.get(key) is False):
        return None
    try:
        forms = SEMI_STRUCTURED.get(values, meta)
        if kernel == "auto" and key not in _FASTER:
            if torch.cuda.is_current_stream_capturing():  # no timing inside a CUDA graph capture: dense for now
                return None
            with torch.no_grad():
                x2 = x.detach().reshape(rows, shape[1])
                dense = _unpack(values.detach(), meta, n, m)
                sparse_ms = _time_ms(lambda: _sparse_linear(x2, forms.weight))
                dense_ms = _time_ms(lambda: torch.nn.functional.linear(x2, dense))
                del dense
            _FASTER[key] = sparse_ms < dense_ms
            _log_once(key, "dsd_fx::nm_linear %s x %d tokens %s: semi-structured %.3f ms, dense %.3f ms: %s kernel",
                      shape, rows, x.dtype, sparse_ms, dense_ms, "sparse" if _FASTER[key] else "dense")
            if not _FASTER[key]:
                return None
        return forms
    except Exception as err:  # noqa: BLE001 - a kernel this build or GPU lacks: dense, logged once
        _UNAVAILABLE.add(key)
        _log_once(key, "dsd_fx::nm_linear %s %s: semi-structured 2:4 kernel unavailable (%s: %s); dense kernel",
                  shape, x.dtype, type(err).__name__, err)
        return None


def _sparse_linear(x: torch.Tensor, sparse: Any) -> torch.Tensor:
    """x @ W.T with W a semi-structured tensor, for x of any rank (the kernels take 2-D, contiguous)."""
    y = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).contiguous(), sparse)
    return y.view(*x.shape[:-1], y.shape[-1])


def _unpack(values: torch.Tensor, meta: torch.Tensor, n: int, m: int) -> torch.Tensor:
    from dsd_fx.sparse.packing import unpack_tensor

    return unpack_tensor(values, meta, n, m)


def _check_impl(impl: str) -> None:
    if impl not in KERNELS:
        raise ValueError(f"dsd_fx::nm_linear: impl={impl!r} (SparseConfig's kernel=) is not one of "
                         f"{', '.join(map(repr, KERNELS))}")


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


@torch.library.custom_op("dsd_fx::nm_linear", mutates_args=())
def nm_linear(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None, n: int, m: int,
    impl: str = "auto",
) -> torch.Tensor:
    """x @ W.T + bias, with W (out, in) stored N:M-packed as (values (out, in*N/M), meta).

    impl (SparseConfig's kernel=; not named `kernel`: Inductor's fallback lowering calls
    FallbackKernel.create(kernel, *args, **kwargs), so an op argument of that name collides with it)
    "auto" (the default): on CUDA, 2:4, fp16/bf16, features multiples of 64, torch's
    semi-structured sparse kernels where, measured once per shape, they beat the dense one;
    "sparse": those kernels wherever they can run; "dense": never. Their compressed weight is
    made once per change of the values (SEMI_STRUCTURED, a CompressedWeights) and shared by
    forward and backward. Otherwise W is scattered for a dense product and freed; why is logged
    once per shape. The weight gradient is dense, gathered at the kept positions.
    """
    _check_impl(impl)
    forms = _sparse_forms(x, values, meta, n, m, impl)
    if forms is not None:
        return _add_bias(_sparse_linear(x, forms.weight), bias)
    weight = _unpack(values, meta, n, m)
    if bias is not None and bias.dim() != 1:  # addmm's broadcast bias
        return torch.nn.functional.linear(x, weight) + bias
    return torch.nn.functional.linear(x, weight, bias)


@nm_linear.register_fake
def _(x, values, meta, bias, n, m, impl="auto"):
    _check_impl(impl)
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _nm_linear_setup(ctx, inputs, output):
    x, values, meta, bias, n, m, impl = inputs
    ctx.save_for_backward(x, values, meta)
    ctx.nm = (n, m, bias is not None)
    ctx.bias_shape = None if bias is None else bias.shape
    # the forward's choice again (cached: no compression, no timing): the input gradient reuses its forms
    ctx.forms = _sparse_forms(x, values, meta, n, m, impl) if x.is_cuda else None


def _nm_linear_backward(ctx, grad):
    from dsd_fx.sparse.packing import gather_nm

    x, values, meta = ctx.saved_tensors
    n, m, has_bias = ctx.nm
    grad_x = None
    if ctx.needs_input_grad[0]:
        forms = ctx.forms
        if forms is not None and forms.transposed is not None:  # grad @ W = linear(grad, W.T), sparse
            grad_x = _sparse_linear(grad, forms.transposed)
        else:
            grad_x = grad @ _unpack(values, meta, n, m)  # rebuilt for the backward only; nothing dense is kept
    grad_values = None
    if ctx.needs_input_grad[1]:
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_w = g2.t() @ x.reshape(-1, x.shape[-1])
        grad_values = gather_nm(grad_w, meta, n, m, values.shape)
    grad_bias = None
    if has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.sum_to_size(ctx.bias_shape)
    return grad_x, grad_values, None, grad_bias, None, None, None


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

        def kernel(_keyset, *args, device=device, excluded=excluded, **kwargs):
            dtype = torch.get_autocast_dtype(device)
            cast = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                return op(*cast, **kwargs)

        lib.impl(opname, kernel, key, with_keyset=True)


_AUTOCAST_LIBS: list = []
_autocast_like_linear("nm_linear")


@torch.library.custom_op("dsd_fx::nm_unpack", mutates_args=())
def nm_unpack(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, dim: int, shape: list[int]) -> torch.Tensor:
    """The dense weight from packed N:M storage, for ops with no packed kernel (Conv): compute is dense."""
    from dsd_fx.sparse.packing import unpack_tensor

    return unpack_tensor(values, meta, n, m, dim).reshape(shape).contiguous()


@nm_unpack.register_fake
def _(values, meta, n, m, dim, shape):
    return values.new_empty(shape)


def _nm_unpack_setup(ctx, inputs, output):
    values, meta, n, m, dim, shape = inputs
    ctx.save_for_backward(meta)
    ctx.nm = (n, m, dim, tuple(values.shape))


def _nm_unpack_backward(ctx, grad):
    from dsd_fx.sparse.masks import nm_view
    from dsd_fx.sparse.packing import gather_nm

    (meta,) = ctx.saved_tensors
    n, m, dim, vshape = ctx.nm
    return gather_nm(nm_view(grad, dim), meta, n, m, vshape), None, None, None, None, None


nm_unpack.register_autograd(_nm_unpack_backward, setup_context=_nm_unpack_setup)
