"""How each kind of op moves channel layouts: one handler per op_table.Flow, plus weight ops."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import fx
from torch.utils._pytree import tree_flatten

from dsd_fx.channels.layout import FlowState, Layout, Segment
from dsd_fx.op_table import ChannelRule


def shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def arg_of(node: fx.Node, index: int, kw: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(kw, default)


def first_input(node: fx.Node):
    """The op's first operand, positional or keyword (`self.fc(input=x)`)."""
    if node.args:
        return node.args[0]
    return next(iter(node.kwargs.values()), None)


def layout_of(prop, node) -> Layout | None:
    lay = prop.layouts.get(node) if isinstance(node, fx.Node) else None
    return lay if isinstance(lay, Layout) else None


def fail(prop, node: fx.Node, reason: str) -> None:
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
        lay = layout_of(prop, a)
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
            fail(prop, node, f"operand '{a.name}' carries {sa[k]} channels that dsd_fx does not track (a model input, "
                            "a constant, or the output of an op that blocks its channels)")
            return None
        if lay.dim != ref.dim or not tie(prop.state, ref, lay):
            fail(prop, node, "its operands' channels cannot be matched one to one (different concatenations or slices)")
            return None
    return ref


def passthrough(prop, node: fx.Node, rule: ChannelRule, module):
    x = first_input(node)
    lay, si, so = layout_of(prop, x), shape(x), shape(node)
    if lay is None:
        return None
    if si is None or so is None or len(si) != len(so) or si[lay.dim] != so[lay.dim]:
        fail(prop, node, "changes the channel dim's size or position")
        return None
    return lay


def norm(prop, node: fx.Node, rule: ChannelRule, module: nn.Module):
    lay = layout_of(prop, first_input(node))
    if lay is None:
        return None
    if lay.dim != 1 or lay.repeat != 1:
        fail(prop, node, f"normalises dim 1, but the channels are at dim {lay.dim}")
        return None
    names = [n for n in rule.params if isinstance(getattr(module, n, None), torch.Tensor)]
    for name in names or [""]:
        prop.state.attach(lay, node.target, name, 0, "norm")
    return lay


def _shape_spec(node: fx.Node, rule: ChannelRule) -> list | None:
    if node.op == "call_module" or not rule.shape_args:
        return None
    spec = list(node.args[1:]) if node.op == "call_method" else [node.args[1]]
    if len(spec) == 1 and isinstance(spec[0], (list, tuple)):
        spec = list(spec[0])
    return spec


def reshape(prop, node: fx.Node, rule: ChannelRule, module):
    x = first_input(node)
    lay, si, so = layout_of(prop, x), shape(x), shape(node)
    if lay is None:
        return None
    c = lay.dim
    before = math.prod(si[:c])
    for k in range(len(so)):
        if math.prod(so[:k]) == before and so[k] % si[c] == 0:
            break
    else:
        fail(prop, node, f"splits the channel dim ({si} -> {so})")
        return None
    merged = so[k] // si[c]
    if merged not in {math.prod(si[c + 1:j]) for j in range(c + 1, len(si) + 1)}:
        fail(prop, node, f"splits the channel dim or mixes it with the dims before it ({si} -> {so})")
        return None
    spec = _shape_spec(node, rule)
    if spec is not None and len(spec) != len(so):
        fail(prop, node, f"reshapes to a computed shape {so}: dsd_fx cannot tell whether its channel entry would shrink")
        return None
    if spec is not None and isinstance(spec[k], int) and spec[k] != -1:
        fail(prop, node, f"reshapes with the literal size {spec[k]} at the channel dim; write -1 there "
                          "(x.view(x.size(0), -1)) so that pruning can shrink it")
        return None
    return Layout(k, lay.segments, lay.repeat * merged)


def move(prop, node: fx.Node, rule: ChannelRule, module):
    lay, n = layout_of(prop, first_input(node)), len(shape(node) or ())
    if lay is None:
        return None
    if rule.permutes:
        dims = list(node.args[1:]) if node.op == "call_method" else list(arg_of(node, 1, "dims"))
        dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
        new = [d % n for d in dims].index(lay.dim)
    else:
        d0, d1 = (int(arg_of(node, 1, "dim0")) % n, int(arg_of(node, 2, "dim1")) % n)
        new = d1 if lay.dim == d0 else d0 if lay.dim == d1 else lay.dim
    return Layout(new, lay.segments, lay.repeat)


def cat(prop, node: fx.Node, rule: ChannelRule, module):
    tensors = list(arg_of(node, 0, "tensors"))
    n = len(shape(node))
    dim = int(arg_of(node, 1, "dim", 0)) % n
    lays = [layout_of(prop, t) for t in tensors]
    if all(lay is None for lay in lays):
        return None
    if any(lay is not None and lay.dim != dim for lay in lays):
        return elementwise(prop, node, rule, module)  # a cat along another dim ties its operands
    repeats = {lay.repeat for lay in lays if lay is not None}
    if len(repeats) > 1 or (None in lays and repeats != {1}):
        fail(prop, node, "concatenates flattened channels of different block sizes")
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
    lay = layout_of(prop, first_input(node))
    metas = node.meta.get("tensor_meta")
    if lay is None or not isinstance(metas, (list, tuple)):
        return None
    n = len(shape(first_input(node)))
    dim = int(arg_of(node, 2, "dim", 0)) % n
    if dim != lay.dim:
        return tuple(lay for _ in metas)
    if lay.repeat != 1:
        fail(prop, node, "splits flattened channels")
        return None
    out, lo = [], 0
    for m in metas:
        out.append(_slice(lay, lo, lo + m.shape[dim]))
        lo += m.shape[dim]
    return tuple(out)


def reduce(prop, node: fx.Node, rule: ChannelRule, module):
    lay = layout_of(prop, first_input(node))
    if lay is None:
        return None
    n = len(shape(first_input(node)))
    dims = arg_of(node, 1, "dim")
    keep = bool(arg_of(node, 2, "keepdim", False))
    dims = [dims] if isinstance(dims, int) else list(dims) if dims is not None else list(range(n))
    dims = [d % n for d in dims]
    if lay.dim in dims:
        fail(prop, node, "reduces over the channel dim")
        return None
    return Layout(lay.dim if keep else lay.dim - sum(d < lay.dim for d in dims), lay.segments, lay.repeat)


def query(prop, node: fx.Node, rule: ChannelRule, module):
    return None  # a size, a dim count or an attribute: no channels flow on


def index(prop, node: fx.Node, rule: ChannelRule, module):
    src, i = node.args
    lay = prop.layouts.get(src)
    if isinstance(lay, tuple) and isinstance(i, int):
        return lay[i]
    if isinstance(lay, Layout):
        prop.state.block([lay], f"node '{node.name}': indexing a tensor whose channels are tracked")
    return None
