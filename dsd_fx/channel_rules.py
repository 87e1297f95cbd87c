"""How each kind of op moves channel layouts: one handler per op_table.Flow, plus weight ops."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import fx
from torch.utils._pytree import tree_flatten

from dsd_fx.channel_layout import FlowState, Layout, Member, Segment
from dsd_fx.op_table import ChannelRule, slot_arg


def shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _arg(node: fx.Node, index: int, kw: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(kw, default)


def first_input(node: fx.Node):
    """The op's first operand, positional or keyword (`self.fc(input=x)`)."""
    if node.args:
        return node.args[0]
    return next(iter(node.kwargs.values()), None)


def _layout(prop, node) -> Layout | None:
    lay = prop.layouts.get(node) if isinstance(node, fx.Node) else None
    return lay if isinstance(lay, Layout) else None


def _fail(prop, node: fx.Node, reason: str) -> None:
    prop.block_inputs(node, reason)  # the output gets no layout: what follows cannot reach these channels


def tie(state: FlowState, a: Layout, b: Layout) -> bool:
    """Tie a's channels to b's (same dim); False where the two cannot be matched channel by channel."""
    if a.segments == b.segments and a.repeat == b.repeat:
        return True
    if len(a.segments) == len(b.segments) == 1 and a.repeat == b.repeat:
        sa, sb = a.segments[0], b.segments[0]
        full = sa.start == sb.start == 0 and sa.length == state.sizes[sa.atom] == sb.length == state.sizes[sb.atom]
        if full:
            state.ties.append((sa.atom, sb.atom))
            return True
    return False


def elementwise(prop, node: fx.Node, rule: ChannelRule, module):
    out = shape(node)
    operands = [a for a in tree_flatten((node.args, node.kwargs))[0] if isinstance(a, fx.Node) and shape(a) is not None]
    placed = []
    for a in operands:
        lay = _layout(prop, a)
        if lay is not None and out is not None:
            lay = Layout(lay.dim + len(out) - len(shape(a)), lay.segments, lay.repeat)
        placed.append((a, lay))
    ref = next((lay for _, lay in placed if lay is not None), None)
    if ref is None:
        return None
    for a, lay in placed:
        if lay is ref:
            continue
        if lay is None:
            sa = shape(a)
            k = ref.dim - (len(out) - len(sa))
            if k < 0 or sa[k] == 1:
                continue
            _fail(prop, node, f"operand '{a.name}' carries {sa[k]} channels that dsd_fx does not track (a model input, "
                            "a constant, or the output of an op that blocks its channels)")
            return None
        if lay.dim != ref.dim or not tie(prop.state, ref, lay):
            _fail(prop, node, "its operands' channels cannot be matched one to one (different concatenations or slices)")
            return None
    return ref


def passthrough(prop, node: fx.Node, rule: ChannelRule, module):
    x = first_input(node)
    lay, si, so = _layout(prop, x), shape(x), shape(node)
    if lay is None:
        return None
    if si is None or so is None or len(si) != len(so) or si[lay.dim] != so[lay.dim]:
        _fail(prop, node, "changes the channel dim's size or position")
        return None
    return lay


def norm(prop, node: fx.Node, rule: ChannelRule, module: nn.Module):
    lay = _layout(prop, first_input(node))
    if lay is None:
        return None
    if lay.dim != 1 or lay.repeat != 1:
        _fail(prop, node, f"normalises dim 1, but the channels are at dim {lay.dim}")
        return None
    names = [n for n in rule.params if isinstance(getattr(module, n, None), torch.Tensor)]
    for name in names or [""]:
        prop.state.attach(lay, node.target, name, 0, "norm")
    return lay


def _shape_spec(node: fx.Node) -> list | None:
    if node.op == "call_module" or node.target in (torch.flatten, "flatten"):
        return None
    spec = list(node.args[1:]) if node.op == "call_method" else [node.args[1]]
    if len(spec) == 1 and isinstance(spec[0], (list, tuple)):
        spec = list(spec[0])
    return spec


def reshape(prop, node: fx.Node, rule: ChannelRule, module):
    x = first_input(node)
    lay, si, so = _layout(prop, x), shape(x), shape(node)
    if lay is None:
        return None
    c = lay.dim
    before = math.prod(si[:c])
    for k in range(len(so)):
        if math.prod(so[:k]) == before and so[k] % si[c] == 0:
            break
    else:
        _fail(prop, node, f"splits the channel dim ({si} -> {so})")
        return None
    merged = so[k] // si[c]
    if merged not in {math.prod(si[c + 1:j]) for j in range(c + 1, len(si) + 1)}:
        _fail(prop, node, f"splits the channel dim or mixes it with the dims before it ({si} -> {so})")
        return None
    spec = _shape_spec(node)
    if spec is not None and len(spec) != len(so):
        _fail(prop, node, f"reshapes to a computed shape {so}: dsd_fx cannot tell whether its channel entry would shrink")
        return None
    if spec is not None and isinstance(spec[k], int) and spec[k] != -1:
        _fail(prop, node, f"reshapes with the literal size {spec[k]} at the channel dim; write -1 there "
                          "(x.view(x.size(0), -1)) so that pruning can shrink it")
        return None
    return Layout(k, lay.segments, lay.repeat * merged)


def move(prop, node: fx.Node, rule: ChannelRule, module):
    lay, n = _layout(prop, first_input(node)), len(shape(node) or ())
    if lay is None:
        return None
    if node.target in ("permute", torch.permute):
        dims = list(node.args[1:]) if node.op == "call_method" else list(_arg(node, 1, "dims"))
        dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
        new = [d % n for d in dims].index(lay.dim)
    else:
        d0, d1 = (int(_arg(node, 1, "dim0")) % n, int(_arg(node, 2, "dim1")) % n)
        new = d1 if lay.dim == d0 else d0 if lay.dim == d1 else lay.dim
    return Layout(new, lay.segments, lay.repeat)


def cat(prop, node: fx.Node, rule: ChannelRule, module):
    tensors = list(_arg(node, 0, "tensors"))
    n = len(shape(node))
    dim = int(_arg(node, 1, "dim", 0)) % n
    lays = [_layout(prop, t) for t in tensors]
    if all(lay is None for lay in lays):
        return None
    if any(lay is not None and lay.dim != dim for lay in lays):
        return elementwise(prop, node, rule, module)  # a cat along another dim ties its operands
    repeats = {lay.repeat for lay in lays if lay is not None}
    if len(repeats) > 1 or (None in lays and repeats != {1}):
        _fail(prop, node, "concatenates flattened channels of different block sizes")
        return None
    segments = []
    for t, lay in zip(tensors, lays):
        if lay is None:  # a part no prunable layer makes: a channel space that stays whole
            size = shape(t)[dim]
            atom = prop.state.atom(size, t.name)
            prop.state.blocked.setdefault(atom, []).append(f"node '{t.name}': not made by a prunable layer")
            lay = Layout(dim, (Segment(atom, 0, size),))
        segments.extend(lay.segments)
    return Layout(dim, tuple(segments), repeats.pop())


def _slice(lay: Layout, lo: int, hi: int) -> Layout:
    out, pos = [], 0
    for s in lay.segments:
        a, b = max(lo, pos), min(hi, pos + s.length)
        if a < b:
            out.append(Segment(s.atom, s.start + a - pos, b - a))
        pos += s.length
    return Layout(lay.dim, tuple(out), lay.repeat)


def split(prop, node: fx.Node, rule: ChannelRule, module):
    lay = _layout(prop, first_input(node))
    metas = node.meta.get("tensor_meta")
    if lay is None or not isinstance(metas, (list, tuple)):
        return None
    n = len(shape(first_input(node)))
    dim = int(_arg(node, 2, "dim", 0)) % n
    if dim != lay.dim:
        return tuple(lay for _ in metas)
    if lay.repeat != 1:
        _fail(prop, node, "splits flattened channels")
        return None
    out, lo = [], 0
    for m in metas:
        out.append(_slice(lay, lo, lo + m.shape[dim]))
        lo += m.shape[dim]
    return tuple(out)


def reduce(prop, node: fx.Node, rule: ChannelRule, module):
    lay = _layout(prop, first_input(node))
    if lay is None:
        return None
    n = len(shape(first_input(node)))
    dims = _arg(node, 1, "dim")
    keep = bool(_arg(node, 2, "keepdim", False))
    dims = [dims] if isinstance(dims, int) else list(dims) if dims is not None else list(range(n))
    dims = [d % n for d in dims]
    if lay.dim in dims:
        _fail(prop, node, "reduces over the channel dim")
        return None
    return Layout(lay.dim if keep else lay.dim - sum(d < lay.dim for d in dims), lay.segments, lay.repeat)


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
        _fail(prop, node, f"{type(module).__name__} has no channel rule in dsd_fx.op_table")
        return None
    slot, w = slots[0], module.weight
    x = first_input(node)
    out_shape, in_shape = shape(node), shape(x)
    if out_shape is None or in_shape is None or row.channel_dim is None:
        _fail(prop, node, f"{type(module).__name__} call without one tensor input and output")
        return None
    out_dim = row.channel_dim % len(out_shape)
    bias = [("bias", 0)] if isinstance(getattr(module, "bias", None), torch.Tensor) else []
    if slot.in_dim is None:  # an embedding: indices in, a new channel space out
        return _new_atom(prop, node, w.shape[slot.out_dim], out_dim, [("weight", slot.out_dim)])
    lay = _layout(prop, x)
    in_dim = row.channel_dim % len(in_shape)
    if lay is not None and lay.dim != in_dim:
        _fail(prop, node, f"{type(module).__name__} consumes dim {in_dim}, but the channels are at dim {lay.dim}")
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
        _fail(prop, node, reason)
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
        return _arg(node, 2, "bias")
    return None if row.packed.bias is None else _arg(node, row.packed.bias, row.packed.bias_kw or "bias")


def function_weight_op(prop, node: fx.Node, row):
    """F.linear, F.conv*, matmul, addmm ... of a parameter read by get_attr: its slot's out_dim /
    in_dim say where channels are made and consumed; the op's other operand is the input."""
    slot = next(s for s in row.slots_of() if s.out_dim is not None)
    weight, bias = slot_arg(node, slot), _bias(node, row)
    x = node.args[row.packed.x if row.packed is not None else 0]
    param, out_shape, in_shape = _param_of(prop, weight), shape(node), shape(x)
    groups = _arg(node, 6, "groups", 1) if row.kind.startswith("conv") else 1
    why = ("its weight is not a parameter read by get_attr" if param is None else f"groups={groups}" if groups != 1
           else "its bias is not a parameter" if bias is not None and _param_of(prop, bias) is None
           else "no tensor shapes" if out_shape is None or in_shape is None else "")
    if why:
        _fail(prop, node, f"{row.kind} called functionally: {why}")
        return None
    w = getattr(prop.gm.get_submodule(param[0]), param[1])
    out_w, in_w = slot.out_dim % w.dim(), slot.in_dim % w.dim()
    lay, in_dim, out_dim = _layout(prop, x), row.channel_dim % len(in_shape), row.channel_dim % len(out_shape)
    if lay is not None and lay.dim != in_dim:
        _fail(prop, node, f"{row.kind} consumes dim {in_dim}, but the channels are at dim {lay.dim}")
        lay = None
    if lay is not None:
        prop.state.attach(lay, param[0], param[1], in_w, "in")
    n = w.shape[out_w]
    atom = prop.state.atom(n, weight.target)
    for (layer, tensor), dim in [(param, out_w)] + ([(_param_of(prop, bias), 0)] if bias is not None else []):
        prop.state.members.append((atom, Member(layer, tensor, dim, "out", 0, 0, n)))
    return Layout(out_dim, (Segment(atom, 0, n),))
