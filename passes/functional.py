"""Module calls -> functional calls of a given weight node: the rewrite table the passes share."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from dsd_fx.tags import tag


def get_attr(g: fx.Graph, target: str) -> fx.Node:
    # select() has checked that the attribute exists; Graph.get_attr would look it up again
    return g.create_node("get_attr", target)


def _input_of(node: fx.Node) -> fx.Node:
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
    gm: fx.GraphModule, node: fx.Node, weight: Callable[[fx.Graph, nn.Module], fx.Node], pass_name: str
) -> fx.Node:
    """Replace `call_module` `node` by a functional call whose weight is `weight(graph, module)`.

    The new op is tagged role "op" with what strip_masks needs to restore the module call.
    """
    g = gm.graph
    module = gm.get_submodule(node.target)
    build = next(fn for cls, fn in FUNCTIONAL.items() if isinstance(module, cls))
    with g.inserting_before(node):
        w = weight(g, module)
        b = tag(get_attr(g, f"{node.target}.bias"), pass_name, "bias") if module.bias is not None else None
        op = build(g, module, _input_of(node), w, b, pass_name)
    tag(op, pass_name, "op", module=node.target, name=node.name, meta={k: v for k, v in node.meta.items() if k != "dsd_fx"})
    op.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    node.replace_all_uses_with(op)
    g.erase_node(node)
    return op


def wrap_weight_uses(
    gm: fx.GraphModule, pw, wrap: Callable[[fx.Graph, fx.Node, bool], fx.Node], pass_name: str
) -> None:
    """Feed every use of the parameter `pw` (a PrunableWeight) through `wrap(graph, weight, sole)`.

    Right after each `get_attr` read, and as the weight of each module call made functional.
    `sole` is true where the wrapped weight feeds exactly one matmul-like op, whose weight
    gradient is then a fresh tensor that nothing else holds.
    """
    g = gm.graph
    weight_reads = {u.node for u in pw.uses}
    for getter in pw.getattrs:
        sole = getter in weight_reads and len(getter.users) == 1
        with g.inserting_before(getter.next):
            new = wrap(g, getter, sole)
        getter.replace_all_uses_with(new, delete_user_cb=lambda user, n=new: user is not n)
    for call in pw.modules:

        def weight(g: fx.Graph, module: nn.Module, target: str = call.target) -> fx.Node:
            return wrap(g, tag(get_attr(g, f"{target}.weight"), pass_name, "weight"), True)

        functionalize(gm, call, weight, pass_name)
