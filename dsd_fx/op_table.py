"""What dsd_fx knows about each op: one typed row per module class or function.

A row says which weights an op reads (its slots), the reduction dimension of each (where N:M
groups run), which dimension of each weight holds output and input channels (for structural
pruning), how a module call becomes a functional call of given weight nodes and back, and
whether the packed N:M kernel (`x @ W.T + b`) can take it. Adding an op is one row: see
`register_function`.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

import dsd_fx.ops  # noqa: F401 - registers dsd_fx::nm_linear, a row of its own (a classifier of packed graphs)


@dataclass(frozen=True)
class Slot:
    """One weight an op reads.

    `name`: the parameter name inside the module (module rows) or the keyword of the argument
    (function rows; "" if it has none). `index`: the positional argument (function rows).
    `reduction`: the dimension the op contracts (N:M groups run along it), counted from the end
    if negative; None where the op contracts several dimensions. `out_dim` / `in_dim`: the
    dimension of the weight that indexes the op's output channels / its input channels (None
    where it has none: the input operand of a matmul).
    """

    name: str
    reduction: int | None
    out_dim: int | None = None
    in_dim: int | None = None
    index: int | None = None


@dataclass(frozen=True)
class Packed:
    """Where a function op that computes `x @ W.T (+ b)` keeps its operands, so that the packed
    N:M kernel can replace it: argument positions (and keywords) of x, the weight and the bias."""

    x: int
    weight: int
    bias: int | None = None
    bias_kw: str | None = None
    no_kwargs: bool = False  # addmm's beta/alpha change the product: not the packed kernel's


class Flow(str, Enum):
    """What an op does to the channel dimension of its tensor operands."""

    ELEMENTWISE = "elementwise"  # broadcast: every tensor operand's channels tie with the output's
    NORM = "norm"  # per-channel statistics; affine params and running stats follow the channels
    PASS = "pass"  # first operand's channels go through unchanged (pooling, dropout, unary math)
    RESHAPE = "reshape"  # flatten / view / reshape: the shapes say where the channel dim goes
    MOVE = "move"  # transpose / permute: the channel dim moves
    CAT = "cat"  # torch.cat along the channel dim: offsets
    SPLIT = "split"  # split / chunk along the channel dim: ranges
    REDUCE = "reduce"  # mean / sum over other dims (global pooling): the channel dim stays
    REFUSE = "refuse"  # channels reaching this op cannot be removed (see reason)
    QUERY = "query"  # size / dim / getattr: reads a shape or an attribute, no channels flow on
    INDEX = "index"  # getitem: one output of a multi-output op (an LSTM's, a split's) takes that output's channels


@dataclass(frozen=True)
class ChannelRule:
    """flow: see Flow. params: the per-channel parameters and buffers of a NORM module, all along
    dim 0. dim_arg / dim_kw: where a function op takes its dim (cat, split, transpose, flatten).
    reason: why a REFUSE op blocks its groups, for the message. shape_args: a RESHAPE op's arguments
    spell its target shape (view, reshape; not flatten). permutes: a MOVE op takes a permutation
    (permute), not two dims to swap (transpose)."""

    flow: Flow
    params: tuple[str, ...] = ()
    dim_arg: int | None = None
    dim_kw: str = "dim"
    reason: str = ""
    shape_args: bool = True
    permutes: bool = False


_ATTENTION = ChannelRule(
    Flow.REFUSE, reason="nn.MultiheadAttention: its embed dim is tied to every head's projections and the "
    "residual stream; dsd_fx does not prune attention (prune the MLP hidden dim instead)")


@dataclass(frozen=True)
class OpRow:
    """Everything dsd_fx knows about one op.

    kind: a short name ("linear", "conv2d", "lstm", ...) used in messages and weight uses.
    slots: the weights it reads (a callable of the module for layers whose weights depend on
        their configuration: an LSTM's `weight_ih_l0`, `weight_hh_l0_reverse`, ...).
    functional: for a layer with a functional form of (input, weight, bias), the builder
        `functional(graph, module, x, w, b) -> node`; re-dense restores the module call from the
        op's input. Layers without one (LSTM, attention) are called through `ops.module_call`.
    packed: where a packed N:M kernel can replace the op; None keeps dense compute.
    fresh_grad: (opt-in) the op's weight gradient is a fresh tensor nothing else holds, so a mask may
        be applied to it in place (bmm/einsum gradients can be expanded views: not fresh).
    channel_dim: the dimension of the op's output that holds its output channels, counted from the
        end so that batched and unbatched inputs agree: -(spatial dims + 1) for conv activations
        ((N, C, H, W) or (C, H, W): -3 for a 2-d conv), -1 for linear features.
    opt_in: pruned only when the user asks (nn.Embedding: a lookup reads rows, it is no matmul).
    channels: how channels flow through the op (structural pruning; see `ChannelRule` at the end
        of this file); None for a weight op means: derived from its slots' out_dim / in_dim.
    family: the op's kind across spatial dims and call forms ("linear", "conv", "conv_transpose",
        "max_pool"), what a check asks for instead of a class; spatial: a conv's or pool's spatial dims
        (`layer_class(family, spatial)` finds the module class: the layers grow adds).
    macs: `macs(module, output shape, input shape)`, the multiply-accumulates of one call (`cost`);
        None counts none.
    classifier_input: the argument position of the input where the op can be the final classifier
        (the push's default tap); None where it cannot.
    resize: `resize(module, channels removed)` after prune or grow replaced its tensors: makes its
        size attributes (`sizes`, which inplace=True copies to the user's layer) say what they hold.
    groups_arg: where a functional convolution takes its groups argument.
    dropped_args: call arguments of a module that its functional form cannot pass on: a call that
        gives them is refused before any change (ConvTranspose's output_size).
    """

    kind: str
    slots: tuple[Slot, ...] | Callable[[nn.Module], tuple[Slot, ...]]
    functional: Callable[..., fx.Node] | None = None
    packed: Packed | None = None
    fresh_grad: bool = False
    channel_dim: int | None = None
    opt_in: bool = False
    channels: "ChannelRule | None" = None
    family: str = ""
    spatial: int | None = None
    macs: Callable[[nn.Module | None, tuple, tuple], int] | None = None
    classifier_input: int | None = None
    resize: Callable[[nn.Module, int], None] | None = None
    sizes: tuple[str, ...] = ()
    groups_arg: int | None = None
    dropped_args: tuple[str, ...] = ()

    def slots_of(self, module: nn.Module | None = None) -> tuple[Slot, ...]:
        return self.slots(module) if callable(self.slots) else self.slots


# ---------------------------------------------------------------- functional forms of layers


def _linear(g: fx.Graph, m: nn.Linear, x, w, b) -> fx.Node:
    return g.call_function(F.linear, (x, w, b))


def _conv(fn):
    def build(g: fx.Graph, m: nn.modules.conv._ConvNd, x, w, b) -> fx.Node:
        if m.padding_mode != "zeros":  # as nn.Conv*._conv_forward: pad explicitly, then convolve unpadded
            x = g.call_function(F.pad, (x, m._reversed_padding_repeated_twice), {"mode": m.padding_mode})
            return g.call_function(fn, (x, w, b, m.stride, (0,) * len(m.stride), m.dilation, m.groups))
        return g.call_function(fn, (x, w, b, m.stride, m.padding, m.dilation, m.groups))

    return build


def _conv_transpose(fn):
    def build(g: fx.Graph, m: nn.modules.conv._ConvTransposeNd, x, w, b) -> fx.Node:
        return g.call_function(fn, (x, w, b, m.stride, m.padding, m.output_padding, m.groups, m.dilation))

    return build


# ---------------------------------------------------------------- multiply-accumulates: (module, out, x) shapes


def _linear_macs(m: nn.Linear, out: tuple, x: tuple) -> int:
    return math.prod(out) * m.in_features


def _conv_macs(m: nn.modules.conv._ConvNd, out: tuple, x: tuple) -> int:
    k = math.prod(m.kernel_size)
    if m.transposed:
        return math.prod(x) * m.out_channels // m.groups * k
    return math.prod(out) * m.in_channels // m.groups * k


def _attention_macs(m: nn.MultiheadAttention, out: tuple, x: tuple) -> int:
    e, t = m.embed_dim, math.prod(out[:-1])
    return 4 * t * e * e + 2 * t * (x[-2] if m.batch_first else x[0]) * e


def _matmul_macs(m: None, out: tuple, x: tuple) -> int:
    return math.prod(out) * x[-1]


# ---------------------------------------------------------------- size attributes after prune / grow


def _linear_resize(m: nn.Linear, removed: int) -> None:
    m.out_features, m.in_features = m.weight.shape


def _conv_resize(m: nn.modules.conv._ConvNd, removed: int) -> None:
    w, groups = m.weight, m.groups
    depthwise = groups > 1 and groups == m.in_channels == m.out_channels
    if depthwise:
        m.groups = m.in_channels = m.out_channels = w.shape[0]
    elif m.transposed:
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * groups
    else:
        m.out_channels, m.in_channels = w.shape[0], w.shape[1] * groups


def _embedding_resize(m: nn.Embedding, removed: int) -> None:
    m.embedding_dim = m.weight.shape[1]


def _norm_resize(m: nn.modules.batchnorm._NormBase, removed: int) -> None:
    m.num_features -= removed


_CONV = dict(fresh_grad=True, macs=_conv_macs, resize=_conv_resize, sizes=("in_channels", "out_channels", "groups"))


# ---------------------------------------------------------------- layers with weights of their own


def _rnn_slots(m: nn.Module) -> tuple[Slot, ...]:
    # weight_ih_l0 (gates*hidden, input), weight_hh_l0_reverse, ...: every one multiplies along dim 1
    return tuple(Slot(n, 1, 0, 1) for n in m._flat_weights_names if n.startswith("weight_"))


def _cell_slots(m: nn.Module) -> tuple[Slot, ...]:
    return (Slot("weight_ih", 1, 0, 1), Slot("weight_hh", 1, 0, 1))


def _attention_slots(m: nn.Module) -> tuple[Slot, ...]:
    names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
    return tuple(Slot(n, 1, 0, 1) for n in names if getattr(m, n, None) is not None)


def _recurrent(name: str) -> "ChannelRule":
    return ChannelRule(Flow.REFUSE, reason=f"{name}: gate-stacked weights and the recurrent state; dsd_fx does not prune recurrent layers")


_WEIGHT = (Slot("weight", 1, 0, 1),)
_WEIGHT_T = (Slot("weight", 0, 1, 0),)  # ConvTranspose: (in_channels, out_channels / groups, ...)

# module class -> row; a subclass that overrides forward computes something else and is not matched
MODULES: dict[type, OpRow] = {
    nn.Linear: OpRow("linear", _WEIGHT, _linear, Packed(x=0, weight=1, bias=2), fresh_grad=True, channel_dim=-1, family="linear",
                     macs=_linear_macs, classifier_input=0, resize=_linear_resize, sizes=("in_features", "out_features")),
    nn.Conv1d: OpRow("conv1d", _WEIGHT, _conv(F.conv1d), channel_dim=-2, family="conv", spatial=1, **_CONV),
    nn.Conv2d: OpRow("conv2d", _WEIGHT, _conv(F.conv2d), channel_dim=-3, family="conv", spatial=2, **_CONV),
    nn.Conv3d: OpRow("conv3d", _WEIGHT, _conv(F.conv3d), channel_dim=-4, family="conv", spatial=3, **_CONV),
    nn.ConvTranspose1d: OpRow("conv_transpose1d", _WEIGHT_T, _conv_transpose(F.conv_transpose1d), channel_dim=-2,
                              family="conv_transpose", spatial=1, dropped_args=("output_size",), **_CONV),
    nn.ConvTranspose2d: OpRow("conv_transpose2d", _WEIGHT_T, _conv_transpose(F.conv_transpose2d), channel_dim=-3,
                              family="conv_transpose", spatial=2, dropped_args=("output_size",), **_CONV),
    nn.ConvTranspose3d: OpRow("conv_transpose3d", _WEIGHT_T, _conv_transpose(F.conv_transpose3d), channel_dim=-4,
                              family="conv_transpose", spatial=3, dropped_args=("output_size",), **_CONV),
    nn.LSTM: OpRow("lstm", _rnn_slots, fresh_grad=False, channels=_recurrent("LSTM")),
    nn.GRU: OpRow("gru", _rnn_slots, fresh_grad=False, channels=_recurrent("GRU")),
    nn.RNN: OpRow("rnn", _rnn_slots, fresh_grad=False, channels=_recurrent("RNN")),
    nn.LSTMCell: OpRow("lstm_cell", _cell_slots, fresh_grad=False, channels=_recurrent("LSTMCell")),
    nn.GRUCell: OpRow("gru_cell", _cell_slots, fresh_grad=False, channels=_recurrent("GRUCell")),
    nn.RNNCell: OpRow("rnn_cell", _cell_slots, fresh_grad=False, channels=_recurrent("RNNCell")),
    nn.MultiheadAttention: OpRow("multihead_attention", _attention_slots, fresh_grad=False, channel_dim=-1, macs=_attention_macs,
                                 channels=_ATTENTION),
    # (num_embeddings, embedding_dim): a row per token; the embedding dim is the output channel
    nn.Embedding: OpRow("embedding", (Slot("weight", 1, 1, None),), fresh_grad=False, channel_dim=-1, opt_in=True,
                        resize=_embedding_resize, sizes=("embedding_dim",)),
}


# ---------------------------------------------------------------- function ops

_MM = Packed(x=0, weight=1)  # x @ W: W is (in, out), the packed kernel takes W.T = (out, in)


def _mm_slots(first: str, second: str) -> tuple[Slot, ...]:
    # input @ other: input (..., k) contracted on its last dim, other (k, n) on dim -2
    return (Slot(first, -1, index=0), Slot(second, -2, out_dim=-1, in_dim=-2, index=1))


def _w(reduction: int, out_dim: int, in_dim: int) -> tuple[Slot, ...]:
    return (Slot("weight", reduction, out_dim, in_dim, index=1),)


_FCONV = dict(fresh_grad=True, groups_arg=6)  # F.conv*(input, weight, bias, stride, padding, dilation | output_padding, groups, ...)


# (fx op, target) -> row
FUNCTIONS: dict[tuple[str, object], OpRow] = {
    ("call_function", F.linear): OpRow("linear", (Slot("weight", -1, 0, 1, index=1),), packed=Packed(0, 1, 2, "bias"), fresh_grad=True,
                                       channel_dim=-1, family="linear", macs=_matmul_macs, classifier_input=0),
    ("call_function", F.conv1d): OpRow("conv1d", _w(1, 0, 1), channel_dim=-2, family="conv", spatial=1, **_FCONV),
    ("call_function", F.conv2d): OpRow("conv2d", _w(1, 0, 1), channel_dim=-3, family="conv", spatial=2, **_FCONV),
    ("call_function", F.conv3d): OpRow("conv3d", _w(1, 0, 1), channel_dim=-4, family="conv", spatial=3, **_FCONV),
    ("call_function", F.conv_transpose1d): OpRow("conv_transpose1d", _w(0, 1, 0), channel_dim=-2, family="conv_transpose",
                                                      spatial=1, **_FCONV),
    ("call_function", F.conv_transpose2d): OpRow("conv_transpose2d", _w(0, 1, 0), channel_dim=-3, family="conv_transpose",
                                                      spatial=2, **_FCONV),
    ("call_function", F.conv_transpose3d): OpRow("conv_transpose3d", _w(0, 1, 0), channel_dim=-4, family="conv_transpose",
                                                      spatial=3, **_FCONV),
    ("call_function", torch.matmul): OpRow("matmul", _mm_slots("input", "other"), packed=_MM, fresh_grad=True, channel_dim=-1, macs=_matmul_macs),
    ("call_function", operator.matmul): OpRow("matmul", _mm_slots("", ""), packed=_MM, fresh_grad=True, channel_dim=-1),
    ("call_function", torch.mm): OpRow("mm", _mm_slots("input", "mat2"), packed=_MM, fresh_grad=True, channel_dim=-1, macs=_matmul_macs),
    ("call_function", torch.addmm): OpRow(
        "addmm", (Slot("mat1", -1, index=1), Slot("mat2", -2, -1, -2, index=2)),
        packed=Packed(x=1, weight=2, bias=0, no_kwargs=True), fresh_grad=True, channel_dim=-1,
    ),
    ("call_function", torch.bmm): OpRow("bmm", _mm_slots("input", "mat2"), fresh_grad=False, channel_dim=-1, macs=_matmul_macs),
    ("call_method", "bmm"): OpRow("bmm", _mm_slots("", "mat2"), fresh_grad=False, channel_dim=-1, macs=_matmul_macs),
    ("call_method", "matmul"): OpRow("matmul", _mm_slots("", "other"), packed=_MM, fresh_grad=True, channel_dim=-1, macs=_matmul_macs),
    ("call_method", "mm"): OpRow("mm", _mm_slots("", "mat2"), packed=_MM, fresh_grad=True, channel_dim=-1, macs=_matmul_macs),
    # einsum's slots depend on its equation: see einsum_slots
    ("call_function", torch.functional.einsum): OpRow("einsum", (), fresh_grad=False),
    # linear ops that no rewrite takes yet (an aten graph's, pack_nm's packed Linear): the final classifier's candidates
    ("call_function", torch.ops.aten.linear.default): OpRow("linear", (), family="linear", classifier_input=0),
    ("call_function", torch.ops.dsd_fx.nm_linear.default): OpRow("nm_linear", (), family="linear", classifier_input=0),
}
EINSUM = FUNCTIONS[("call_function", torch.functional.einsum)]


def register_function(target: object, row: OpRow, op: str = "call_function") -> None:
    """Teach dsd_fx a function op: `register_function(my_linear, OpRow("my_linear", (Slot("weight", -1, 0, 1, index=1),),
    packed=Packed(x=0, weight=1, bias=2)))`. Its weights are then masked, packed where `packed` says, and re-densed."""
    if not isinstance(row, OpRow):
        raise TypeError(f"register_function needs an OpRow, got {type(row).__name__}")
    FUNCTIONS[(op, target)] = row


def module_row(module: nn.Module) -> OpRow | None:
    """The row of `module`'s class, or None (also for a subclass that overrides forward)."""
    for cls, row in MODULES.items():
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return row
    return None


def layer_class(family: str, spatial: int) -> type:
    """The module class of the row of `family` with `spatial` dims (layer_class("conv", 2) is nn.Conv2d)."""
    for cls, row in MODULES.items():
        if row.family == family and row.spatial == spatial:
            return cls
    raise KeyError(f"op_table: no layer of family {family!r} with {spatial} spatial dims")


def function_row(node: fx.Node) -> OpRow | None:
    if node.op not in ("call_function", "call_method"):
        return None
    try:
        return FUNCTIONS.get((node.op, node.target))
    except TypeError:  # an unhashable target
        return None


def einsum_operands(node: fx.Node) -> tuple[str, list]:
    equation, *ops = node.args
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    return equation, ops


def einsum_reduction_dims(equation: str, n_operands: int) -> list[int | None]:
    """Per operand of `equation`: the position of its one contracted index, or None (none or several, or '...')."""
    eq = equation.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    inputs = lhs.split(",")
    if len(inputs) != n_operands:
        return [None] * n_operands
    if not arrow:  # implicit output: the indices that appear once, sorted
        letters = [c for c in lhs if c.isalpha()]
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    dims = []
    for sub in inputs:
        contracted = [k for k, c in enumerate(sub) if c.isalpha() and c not in out]
        dims.append(contracted[0] if len(contracted) == 1 and "." not in sub else None)
    return dims


def einsum_slots(node: fx.Node) -> tuple[Slot, ...]:
    equation, ops = einsum_operands(node)
    dims = einsum_reduction_dims(equation, len(ops))
    return tuple(Slot("", dim, index=k) for k, dim in enumerate(dims))


def slot_arg(node: fx.Node, slot: Slot) -> object:
    """The argument of `node` in `slot` (positional or keyword)."""
    if node.target in (torch.functional.einsum, torch.ops.aten.einsum.default):
        return einsum_operands(node)[1][slot.index]
    if slot.index is not None and slot.index < len(node.args):
        return node.args[slot.index]
    return node.kwargs.get(slot.name) if slot.name else None


@dataclass(frozen=True)
class PackedCall:
    """A use of weight `getter` that the packed kernel can compute: x, bias and the templates that
    re-dense fills to rebuild the original call ("$x", "$W", "$b" mark the operands)."""

    x: fx.Node
    bias: object
    args: tuple
    kwargs: dict = field(default_factory=dict)


def packed_call(user: fx.Node, getter: fx.Node) -> PackedCall | None:
    """How `user` computes x @ W.T-like (+ b) with W = `getter`, if the packed kernel can take it."""
    row = function_row(user)
    p = row.packed if row is not None else None
    if p is None or len(user.args) <= p.weight or user.args[p.weight] is not getter:
        return None
    if p.no_kwargs and user.kwargs:
        return None
    x = user.args[p.x]
    b = None
    if p.bias is not None:
        b = user.args[p.bias] if len(user.args) > p.bias else user.kwargs.get(p.bias_kw or "")
    marks = {getter: "$W", x: "$x"}
    if isinstance(b, fx.Node):
        marks[b] = "$b"
    nodes = [a for a in (*user.args, *user.kwargs.values()) if isinstance(a, fx.Node)]
    if any(a not in marks for a in nodes) or list(user.args).count(getter) != 1:
        return None
    mark = lambda a: marks.get(a, a) if isinstance(a, fx.Node) else a  # noqa: E731
    return PackedCall(x, b, tuple(mark(a) for a in user.args), {k: mark(v) for k, v in user.kwargs.items()})


def known_ops() -> str:
    """The ops of the table, for messages."""
    layers = sorted({cls.__name__ for cls in MODULES})
    functions = sorted({getattr(t, "__name__", str(t)) for (_, t) in FUNCTIONS})
    return ", ".join(layers) + "; functions " + ", ".join(functions)


# ---- channel flow (structural pruning)
# How channels flow through ops that hold no matmul weight, for dsd_fx.channels.groups. Weight ops
# (Linear, Conv*, ConvTranspose*, Embedding) need no rule: their slots' out_dim / in_dim and the
# row's channel_dim say where channels are made and consumed. An op with no row blocks the
# channel groups that reach it.


_EW, _PASS = ChannelRule(Flow.ELEMENTWISE), ChannelRule(Flow.PASS)
_BN = ChannelRule(Flow.NORM, ("weight", "bias", "running_mean", "running_var"))
_STATS_ACROSS = "normalises over the channel dim: removing a channel changes every other channel's statistics"

for _cls in (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Hardswish,
             nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
             nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
             nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
             nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d):
    MODULES[_cls] = OpRow(_cls.__name__.lower(), (), channel_dim=1, channels=_PASS)
for _k, _cls in enumerate((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), 1):
    MODULES[_cls] = OpRow(_cls.__name__.lower(), (), channel_dim=1, channels=_PASS, family="max_pool", spatial=_k)
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
    MODULES[_cls] = OpRow(_cls.__name__.lower(), (), channel_dim=1, channels=_BN, resize=_norm_resize, sizes=("num_features",))
MODULES[nn.Flatten] = OpRow("flatten", (), channels=ChannelRule(Flow.RESHAPE, shape_args=False))
MODULES[nn.GroupNorm] = OpRow("groupnorm", (), channel_dim=1, channels=ChannelRule(Flow.REFUSE, reason="GroupNorm " + _STATS_ACROSS))
MODULES[nn.LayerNorm] = OpRow("layernorm", (), channel_dim=-1, channels=ChannelRule(Flow.REFUSE, reason="LayerNorm " + _STATS_ACROSS))

_ELEMENTWISE_FUNCTIONS = (operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul, torch.sub,
                          torch.div, torch.maximum, torch.minimum, torch.where, torch.pow, operator.pow)
_UNARY_FUNCTIONS = (F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, F.hardswish, F.hardsigmoid, F.mish,
                    F.dropout, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg,
                    torch.clamp, operator.neg, F.max_pool1d, F.max_pool2d, F.max_pool3d,
                    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                    F.adaptive_avg_pool3d, F.adaptive_max_pool2d)
for _fn in _ELEMENTWISE_FUNCTIONS:
    FUNCTIONS[("call_function", _fn)] = OpRow(getattr(_fn, "__name__", str(_fn)), (), channels=_EW)
for _fn in _UNARY_FUNCTIONS:
    FUNCTIONS[("call_function", _fn)] = OpRow(getattr(_fn, "__name__", str(_fn)), (), channels=_PASS)
for _name in ("add", "mul", "sub", "div", "add_", "mul_", "pow"):
    FUNCTIONS[("call_method", _name)] = OpRow(_name, (), channels=_EW)
for _name in ("relu", "sigmoid", "tanh", "contiguous", "clone", "abs", "neg", "exp", "relu_", "clamp", "float", "to",
              "type_as", "detach"):
    FUNCTIONS[("call_method", _name)] = OpRow(_name, (), channels=_PASS)
for _key in (("call_function", torch.flatten), ("call_method", "flatten")):
    FUNCTIONS[_key] = OpRow("reshape", (), channels=ChannelRule(Flow.RESHAPE, shape_args=False))
for _key in (("call_method", "view"), ("call_method", "reshape"), ("call_function", torch.reshape)):
    FUNCTIONS[_key] = OpRow("reshape", (), channels=ChannelRule(Flow.RESHAPE))
for _key in (("call_function", torch.transpose), ("call_method", "transpose")):
    FUNCTIONS[_key] = OpRow("move", (), channels=ChannelRule(Flow.MOVE))
for _key in (("call_method", "permute"), ("call_function", torch.permute)):
    FUNCTIONS[_key] = OpRow("move", (), channels=ChannelRule(Flow.MOVE, permutes=True))
for _key in (("call_method", "size"), ("call_method", "dim"), ("call_function", getattr)):
    FUNCTIONS[_key] = OpRow("query", (), channels=ChannelRule(Flow.QUERY))
FUNCTIONS[("call_function", operator.getitem)] = OpRow("getitem", (), channels=ChannelRule(Flow.INDEX))
FUNCTIONS[("call_function", torch.cat)] = OpRow("cat", (), channels=ChannelRule(Flow.CAT, dim_arg=1))
FUNCTIONS[("call_function", torch.concat)] = OpRow("cat", (), channels=ChannelRule(Flow.CAT, dim_arg=1))
for _key in (("call_function", torch.split), ("call_method", "split")):
    FUNCTIONS[_key] = OpRow("split", (), channels=ChannelRule(Flow.SPLIT, dim_arg=2))
for _key in (("call_function", torch.chunk), ("call_method", "chunk")):
    FUNCTIONS[_key] = OpRow("chunk", (), channels=ChannelRule(Flow.SPLIT, dim_arg=2))
for _fn in (F.layer_norm, F.group_norm, F.softmax, torch.softmax, F.scaled_dot_product_attention):
    FUNCTIONS[("call_function", _fn)] = OpRow(_fn.__name__, (), channels=ChannelRule(
        Flow.REFUSE, reason=f"{_fn.__name__} mixes channels (statistics or attention across the channel dim)"))


def channel_rule(row: OpRow | None) -> ChannelRule | None:
    """The channel rule of `row`: its own, or None (no row, or a weight op: see its slots)."""
    return None if row is None else row.channels
for _key in (("call_method", "mean"), ("call_function", torch.mean), ("call_method", "sum"), ("call_function", torch.sum),
             ("call_method", "amax"), ("call_function", torch.amax)):
    FUNCTIONS[_key] = OpRow("reduce", (), channels=ChannelRule(Flow.REDUCE, dim_arg=1))
del _cls, _fn, _key, _name, _k

# the aten rows (what torch.export's graphs call): dsd_fx.aten_rows, which the package's __init__ registers
