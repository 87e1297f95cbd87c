"""Where weight ops make and consume channels: module layers and functional calls of parameters."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import fx

from dsd_fx.channels.layout import Layout, Member, Segment
from dsd_fx.channels.rules import arg_of, fail, first_input, layout_of, shape
from dsd_fx.op_table import slot_arg


def _new_atom(prop, node: fx.Node, size: int, dim: int, members: list[tuple[str, int]], blocked: str = "") -> Layout:
    atom = prop.state.atom(size, node.target)
    for tensor, tdim in members:
        prop.state.members.append((atom, _out_member(node.target, tensor, tdim, size)))
    if blocked:
        prop.state.blocked.setdefault(atom, []).append(f"node '{node.name}': {blocked}")
    return Layout(dim, (Segment(atom, 0, size),))


def _out_member(layer: str, tensor: str, dim: int, size: int) -> Member:
    return Member(layer, tensor, dim, "out", 0, 0, size)


def weight_op(prop, node: fx.Node, module: nn.Module, row):
    """Linear, Conv*, ConvTranspose*, Embedding: where their slot's out_dim / in_dim and the row's
    channel_dim say. Depthwise convs tie input and output channels; other grouped convs block."""
    slots = row.slots_of(module)
    if len(slots) != 1 or slots[0].out_dim is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
        fail(prop, node, f"{type(module).__name__} has no channel rule in dsd_fx.op_table")
        return None
    slot, w = slots[0], module.weight
    x = first_input(node)
    out_shape, in_shape = shape(node), shape(x)
    if out_shape is None or in_shape is None or row.channel_dim is None:
        fail(prop, node, f"{type(module).__name__} call without one tensor input and output")
        return None
    out_dim = row.channel_dim % len(out_shape)
    bias = [("bias", 0)] if isinstance(getattr(module, "bias", None), torch.Tensor) else []
    if slot.in_dim is None:  # an embedding: indices in, a new channel space out
        return _new_atom(prop, node, w.shape[slot.out_dim], out_dim, [("weight", slot.out_dim)])
    lay = layout_of(prop, x)
    in_dim = row.channel_dim % len(in_shape)
    if lay is not None and lay.dim != in_dim:
        fail(prop, node, f"{type(module).__name__} consumes dim {in_dim}, but the channels are at dim {lay.dim}")
        lay = None
    groups = getattr(module, "groups", 1)
    n_out = out_shape[out_dim]
    if groups > 1 and groups == in_shape[in_dim] == n_out:  # depthwise: channel i in is channel i out
        if lay is None or lay.repeat != 1:
            return None
        for tensor, tdim in [("weight", 0), *bias]:
            prop.state.attach(lay, node.target, tensor, tdim, "out")
        return lay
    if groups > 1:
        reason = f"grouped {type(module).__name__} (groups={groups}): removing channels would unbalance its groups"
        fail(prop, node, reason)
        return _new_atom(prop, node, n_out, out_dim, [("weight", slot.out_dim), *bias], reason)
    if lay is not None:
        prop.state.attach(lay, node.target, "weight", slot.in_dim, "in")
    return _new_atom(prop, node, n_out, out_dim, [("weight", slot.out_dim), *bias])


def _param_of(prop, arg) -> tuple[str, str] | None:
    """(owner module path, attribute) of a get_attr of a parameter, else None."""
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    layer, _, attr = arg.target.rpartition(".")
    owner = prop.gm.get_submodule(layer)
    return (layer, attr) if isinstance(getattr(owner, attr, None), nn.Parameter) else None


def _bias(node: fx.Node, row):
    if row.packed is None:  # F.conv*: (input, weight, bias, ...)
        return arg_of(node, 2, "bias")
    return None if row.packed.bias is None else arg_of(node, row.packed.bias, row.packed.bias_kw or "bias")


def function_weight_op(prop, node: fx.Node, row):
    """F.linear, F.conv*, matmul, addmm ... of a parameter read by get_attr: its slot's out_dim /
    in_dim say where channels are made and consumed; the op's other operand is the input."""
    slot = next(s for s in row.slots_of() if s.out_dim is not None)
    weight, bias = slot_arg(node, slot), _bias(node, row)
    x = node.args[row.packed.x if row.packed is not None else 0]
    param, out_shape, in_shape = _param_of(prop, weight), shape(node), shape(x)
    groups = arg_of(node, row.groups_arg, "groups", 1) if row.groups_arg is not None else 1
    why = ("its weight is not a parameter read by get_attr" if param is None else f"groups={groups}" if groups != 1
           else "its bias is not a parameter" if bias is not None and _param_of(prop, bias) is None
           else "no tensor shapes" if out_shape is None or in_shape is None else "")
    if why:
        fail(prop, node, f"{row.kind} called functionally: {why}")
        return None
    w = getattr(prop.gm.get_submodule(param[0]), param[1])
    out_w, in_w = slot.out_dim % w.dim(), slot.in_dim % w.dim()
    lay, in_dim, out_dim = layout_of(prop, x), row.channel_dim % len(in_shape), row.channel_dim % len(out_shape)
    if lay is not None and lay.dim != in_dim:
        fail(prop, node, f"{row.kind} consumes dim {in_dim}, but the channels are at dim {lay.dim}")
        lay = None
    if lay is not None:
        prop.state.attach(lay, param[0], param[1], in_w, "in")
    n = w.shape[out_w]
    atom = prop.state.atom(n, weight.target)
    for (layer, tensor), dim in [(param, out_w)] + ([(_param_of(prop, bias), 0)] if bias is not None else []):
        prop.state.members.append((atom, Member(layer, tensor, dim, "out", 0, 0, n)))
    return Layout(out_dim, (Segment(atom, 0, n),))
