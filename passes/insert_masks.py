"""insert_masks: give every prunable weight use a visible mask multiplication."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from dsd_fx.ops import mask_mul
from dsd_fx.select import PrunableWeight
from dsd_fx.tags import tag

PASS = "insert_masks"


def _owner(gm: fx.GraphModule, qualname: str) -> tuple[nn.Module, str]:
    path, _, attr = qualname.rpartition(".")
    return (gm.get_submodule(path) if path else gm), attr


def _input_of(node: fx.Node) -> fx.Node:
    return node.args[0] if node.args else node.kwargs["input"]


def _linear(g: fx.Graph, node: fx.Node, m: nn.Linear, x, w, b) -> fx.Node:
    return g.call_function(F.linear, (x, w, b))


_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_CONVT = {nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d, nn.ConvTranspose3d: F.conv_transpose3d}


def _conv(g: fx.Graph, node: fx.Node, m: nn.modules.conv._ConvNd, x, w, b) -> fx.Node:
    fn = _CONV[next(c for c in _CONV if isinstance(m, c))]
    if m.padding_mode != "zeros":
        # as nn.Conv*._conv_forward does: pad explicitly, then convolve without padding
        x = tag(g.call_function(F.pad, (x, m._reversed_padding_repeated_twice), {"mode": m.padding_mode}), PASS, "pad")
        return g.call_function(fn, (x, w, b, m.stride, (0,) * len(m.stride), m.dilation, m.groups))
    return g.call_function(fn, (x, w, b, m.stride, m.padding, m.dilation, m.groups))


def _conv_transpose(g: fx.Graph, node: fx.Node, m: nn.modules.conv._ConvTransposeNd, x, w, b) -> fx.Node:
    fn = _CONVT[next(c for c in _CONVT if isinstance(m, c))]
    return g.call_function(fn, (x, w, b, m.stride, m.padding, m.output_padding, m.groups, m.dilation))


# module type -> builder of the equivalent functional call, taking the masked weight
FUNCTIONAL: dict[type, Callable[..., fx.Node]] = {
    nn.Linear: _linear,
    **{c: _conv for c in _CONV},
    **{c: _conv_transpose for c in _CONVT},
}


def _functional_builder(module: nn.Module) -> Callable[..., fx.Node]:
    return next(fn for cls, fn in FUNCTIONAL.items() if isinstance(module, cls))


def _get_attr(g: fx.Graph, target: str) -> fx.Node:
    # select() has checked that the attribute exists; Graph.get_attr would look it up again
    return g.create_node("get_attr", target)


def _masked(g: fx.Graph, weight: fx.Node, mask_name: str, pw: PrunableWeight, sole_weight_op: bool) -> fx.Node:
    mask = tag(_get_attr(g, mask_name), PASS, "mask", weight=pw.name)
    kwargs = {"grad_inplace": True} if sole_weight_op else {}
    return tag(g.call_function(mask_mul, (weight, mask), kwargs), PASS, "mul", weight=pw.name)


def insert_masks(gm: fx.GraphModule, masks: Sequence[tuple[PrunableWeight, torch.Tensor]]) -> PassResult:
    """Register `<weight>_mask` buffers and multiply every use of each weight by its mask.

    Before::

        fc1 = self.fc1(x);  x = None
        relu = torch.relu(fc1)

    After::

        fc1_weight = self.fc1.weight
        fc1_weight_mask = self.fc1.weight_mask
        mask_mul = dsd_fx_ops_mask_mul(fc1_weight, fc1_weight_mask, grad_inplace = True)
        fc1_bias = self.fc1.bias
        linear = torch._C._nn.linear(x, mask_mul, fc1_bias)
        relu = torch.relu(linear)

    `mask_mul` is W * M in value and gradient (see dsd_fx.ops for why it is not `torch.mul`).
    Module calls become functional calls of the masked weight; a parameter read by `get_attr`
    gets its multiplication right after the read, once per read. One buffer per parameter, so a
    weight used several times is masked identically everywhere.
    """
    g = gm.graph
    for pw, mask in masks:
        owner, attr = _owner(gm, pw.mask_name)
        owner.register_buffer(attr, mask)
        weight_reads = {u.node for u in pw.uses}
        for getter in pw.getattrs:
            # the weight gradient of a matmul-like op is a fresh tensor: safe to mask in place
            sole = getter in weight_reads and len(getter.users) == 1
            with g.inserting_before(getter.next):
                masked = _masked(g, getter, pw.mask_name, pw, sole)
            getter.replace_all_uses_with(masked, delete_user_cb=lambda user, m=masked: user is not m)
        for node in pw.modules:
            module = gm.get_submodule(node.target)
            with g.inserting_before(node):
                w = tag(_get_attr(g, f"{node.target}.weight"), PASS, "weight")
                masked = _masked(g, w, pw.mask_name, pw, True)
                b = tag(_get_attr(g, f"{node.target}.bias"), PASS, "bias") if module.bias is not None else None
                op = _functional_builder(module)(g, node, module, _input_of(node), masked, b)
            tag(op, PASS, "op", module=node.target, name=node.name, meta={k: v for k, v in node.meta.items() if k != "dsd_fx"})
            op.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
            node.replace_all_uses_with(op)
            g.erase_node(node)
    return PassResult(gm, modified=bool(masks))
