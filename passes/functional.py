"""Module calls -> functional calls of a given weight node: the rewrite table the passes share."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from dsd_fx.ops import module_call
from dsd_fx.select import is_direct
from dsd_fx.tags import tag, untagged_meta


def get_attr(g: fx.Graph, target: str) -> fx.Node:
    # select() has checked that the attribute exists; Graph.get_attr would look it up again
    return g.create_node("get_attr", target)


def input_of(node: fx.Node) -> fx.Node:
    return node.args[0] if node.args else node.kwargs["input"]


_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_CONVT = {nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d, nn.ConvTranspose3d: F.conv_transpose3d}


def _linear(g, m: nn.Linear, x, w, b, pass_name):
    return g.call_function(F.linear, (x, w, b))


def _conv(g, m: nn.modules.conv._ConvNd, x, w, b, pass_name):
    fn = _CONV[next(c for c in _CONV if isinstance(m, c))]
    if m.padding_mode != "zeros":
        # as nn.Conv*._conv_forward does: pad explicitly, then convolve without padding
        x = tag(g.call_function(F.pad, (x, m._reversed_padding_repeated_twice), {"mode": m.padding_mode}), pass_name, "pad")
        return g.call_function(fn, (x, w, b, m.stride, (0,) * len(m.stride), m.dilation, m.groups))
    return g.call_function(fn, (x, w, b, m.stride, m.padding, m.dilation, m.groups))


def _conv_transpose(g, m: nn.modules.conv._ConvTransposeNd, x, w, b, pass_name):
    fn = _CONVT[next(c for c in _CONVT if isinstance(m, c))]
    return g.call_function(fn, (x, w, b, m.stride, m.padding, m.output_padding, m.groups, m.dilation))


# module type -> builder of the equivalent functional call of (input, weight node, bias node)
FUNCTIONAL: dict[type, Callable[..., fx.Node]] = {
    nn.Linear: _linear,
    **{c: _conv for c in _CONV},
    **{c: _conv_transpose for c in _CONVT},
}


def functionalize(
    gm: fx.GraphModule, node: fx.Node, weights: Callable[[fx.Graph], dict[str, fx.Node]], pass_name: str
) -> fx.Node:
    """Replace `call_module` `node` by a functional call that reads `weights(graph)`, a dict from
    parameter name inside the module ("weight", "weight_hh_l0", ...) to the node to use instead.

    Linear, Conv* and ConvTranspose* become F.linear / F.conv* of (input, weight, bias); every other
    layer (LSTM, MultiheadAttention, TransformerEncoderLayer, Embedding, ...) becomes
    `dsd_fx.ops.module_call(module, names, weights, args, kwargs)`, the layer's own forward with
    those parameters swapped in. The new op is tagged role "op" with what strip_masks needs to
    restore the module call.
    """
    g = gm.graph
    module = gm.get_submodule(node.target)
    build = next((fn for cls, fn in FUNCTIONAL.items() if isinstance(module, cls)), None) if is_direct(module) else None
    with g.inserting_before(node):
        ws = weights(g)
        if build is not None:
            b = tag(get_attr(g, f"{node.target}.bias"), pass_name, "bias") if module.bias is not None else None
            op = build(g, module, input_of(node), ws["weight"], b, pass_name)
        else:
            layer = tag(get_attr(g, node.target), pass_name, "layer")
            op = g.call_function(module_call, (layer, tuple(ws), tuple(ws.values()), node.args, node.kwargs))
    tag(op, pass_name, "op", module=node.target, name=node.name, meta=untagged_meta(node))
    op.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    node.replace_all_uses_with(op)
    g.erase_node(node)
    return op


def wrap_weight_uses(
    gm: fx.GraphModule, items: Sequence[tuple[Any, Callable[[fx.Graph, fx.Node, bool], fx.Node]]], pass_name: str
) -> None:
    """Feed every use of each parameter through its wrapper: `items` is [(PrunableWeight, wrap)],
    `wrap(graph, weight node, sole)` making the node that stands for the weight.

    Right after each `get_attr` read, and as the weights of each module call made functional (one
    functional call per module call, whatever number of its weights are wrapped). `sole` is true
    where the wrapped weight feeds exactly one matmul-like op, whose weight gradient is then a
    fresh tensor that nothing else holds.
    """
    g = gm.graph
    calls: dict[fx.Node, list[tuple[str, str, Callable]]] = {}
    for pw, wrap in items:
        # bmm / einsum weight gradients can be expanded views: never masked in place
        weight_reads = {u.node for u in pw.uses if u.kind not in ("bmm", "einsum")}
        for getter in pw.getattrs:
            sole = getter in weight_reads and len(getter.users) == 1
            with g.inserting_before(getter.next):
                new = wrap(g, getter, sole)
            getter.replace_all_uses_with(new, delete_user_cb=lambda user, n=new: user is not n)
        for use in pw.uses:
            if use.node.op == "call_module":
                calls.setdefault(use.node, []).append((use.param, f"{use.node.target}.{use.param}", wrap))
    for call, wrapped in calls.items():
        direct = is_direct(gm.get_submodule(call.target))

        def weights(g: fx.Graph, wrapped=wrapped, direct=direct) -> dict[str, fx.Node]:
            # a Linear/Conv weight gradient is fresh; an LSTM's may be a view of a flat buffer
            return {name: wrap(g, tag(get_attr(g, target), pass_name, "weight"), direct) for name, target, wrap in wrapped}

        functionalize(gm, call, weights, pass_name)
