"""How each kind of op moves channel layouts: one handler per op_table.Flow, plus weight ops."""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn
from torch import fx
from torch.utils._pytree import tree_flatten

from dsd_fx.channels.layout import FlowState, Layout, Segment
from dsd_fx.channels.sizes import size_of
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


def tensor_attr(prop, node) -> tuple[str, str] | None:
    """(owner module path, attribute) of a get_attr of a parameter or buffer, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    layer, _, attr = node.target.rpartition(".")
    return (layer, attr) if isinstance(getattr(prop.gm.get_submodule(layer), attr, None), torch.Tensor) else None


def _through_expand(node):
    """The tensor an `expand` broadcasts without adding dims (ViT's class_token.expand(B, -1, -1)), else `node`."""
    if isinstance(node, fx.Node) and node.target in ("expand", torch.ops.aten.expand.default) and node.args:
        src = node.args[0]
        if isinstance(src, fx.Node) and len(shape(src) or ()) == len(shape(node) or ()):
            return src
    return node


def fail(prop, node: fx.Node, reason: str) -> None:
    prop.block_inputs(node, reason)  # the output gets no layout: what follows cannot reach these channels


def tie(state: FlowState, a: Layout, b: Layout) -> bool:
    """Tie a's channels to b's, index by index of their dim; False where the two cannot be matched.

    Two whole channel spaces read in different blocks (query heads and the KV heads repeated for
    them) tie in parts: index i holds a's block i // a.repeat and b's block i // b.repeat, so the
    finest parts that hold whole blocks of both are gcd(a's blocks, b's blocks) in number."""
    if a.segments == b.segments and a.repeat == b.repeat and a.unit == b.unit:
        return True
    if len(a.segments) == len(b.segments) == 1:
        sa, sb = a.segments[0], b.segments[0]
        full = sa.start == sb.start == 0 and sa.length == state.sizes[sa.atom] and sb.length == state.sizes[sb.atom]
        na, nb = sa.length // a.unit, sb.length // b.unit
        if na * a.repeat == nb * b.repeat:
            if full:
                state.ties.append((sa.atom, sb.atom, math.gcd(na, nb)))
            elif sa != sb:  # parts of channel spaces (a fused QKV's q and k ranges): channels.groups_of cuts them out
                state.range_ties.append((sa, sb, math.gcd(na, nb)))
            return True
    return False


def elementwise(prop, node: fx.Node, rule: ChannelRule, module):
    out = shape(node)
    operands = [a for a in tree_flatten((node.args, node.kwargs))[0] if isinstance(a, fx.Node) and shape(a) is not None]
    placed = []
    for a in operands:
        lay = layout_of(prop, a)
        if lay is not None and out is not None:
            lay = replace(lay, dim=lay.dim + len(out) - len(shape(a)))
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
            owner = tensor_attr(prop, _through_expand(a))
            if owner is not None:  # a per-channel parameter (a scale, an RMSNorm weight, ViT's class token): its slices follow
                prop.state.attach(ref, owner[0], owner[1], k, "norm")
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


def attach_module_params(prop, node: fx.Node, lay: Layout, rule: ChannelRule, module: nn.Module) -> Layout:
    """A norm module's per-channel parameters and buffers (rule.params, along dim 0) follow the channels;
    a module with none is still a member (its count)."""
    names = [n for n in rule.params if isinstance(getattr(module, n, None), torch.Tensor)]
    for name in names or [""]:
        prop.state.attach(lay, node.target, name, 0, "norm")
    return lay


def norm(prop, node: fx.Node, rule: ChannelRule, module: nn.Module):
    lay = layout_of(prop, first_input(node))
    if lay is None:
        return None
    if lay.dim != 1 or lay.repeat != 1 or lay.unit != 1:
        fail(prop, node, f"normalises dim 1, but the channels are at dim {lay.dim}" if lay.dim != 1
             else "normalises single channels of a tensor whose channels are flattened or split into heads")
        return None
    if module is None:  # a functional batch norm: its tensor arguments are per-channel (weight, bias, running stats)
        for t in node.args[1:5]:
            owner = tensor_attr(prop, t)
            if owner is None and isinstance(t, fx.Node):
                fail(prop, node, f"its per-channel operand '{t.name}' is not a parameter or buffer read by get_attr")
                return None
            if owner is not None:
                prop.state.attach(lay, owner[0], owner[1], 0, "norm")
        return lay
    return attach_module_params(prop, node, lay, rule, module)


aten = torch.ops.aten


def _shape_spec(node: fx.Node, rule: ChannelRule) -> list | None:
    """The target shape a view / reshape names, one entry per output dim (None: the op names none)."""
    if node.op == "call_module" or not rule.shape_args:
        return None
    spec = list(node.args[1:]) if node.op == "call_method" else [node.args[1]]
    if len(spec) == 1 and isinstance(spec[0], (list, tuple)):
        spec = list(spec[0])
    return spec


def _spec_path(node: fx.Node, rule: ChannelRule, k: int, n_out: int) -> tuple | None:
    """Where output dim k's size sits in the node's arguments: (arg index,) or (arg index, item)."""
    if node.target in ("unflatten", torch.unflatten, aten.unflatten.int):
        first = int(arg_of(node, 1, "dim")) % n_out
        sizes = arg_of(node, 2, "sizes")
        return (2, k - first) if first <= k < first + len(sizes) else None
    if _shape_spec(node, rule) is None:
        return None
    if node.op == "call_method" and not (len(node.args) == 2 and isinstance(node.args[1], (list, tuple))):
        return (1 + k,)
    return (1, k)


def literal_at(node: fx.Node, path: tuple | None):
    """The value at `path` of the node's arguments (None where there is none)."""
    if path is None or len(node.args) <= path[0]:
        return None
    value = node.args[path[0]]
    for p in path[1:]:
        if not isinstance(value, (list, tuple)) or len(value) <= p:
            return None
        value = value[p]
    return value


def attach_literal(prop, node: fx.Node, lay: Layout, path: tuple | None) -> None:
    """A literal int at the channel dim of a shape argument follows the channels: the prune pass rewrites it."""
    value = literal_at(node, path)
    if isinstance(value, int) and not isinstance(value, bool) and value != -1:
        prop.state.attach(lay, node.name, "#" + ".".join(map(str, path)), 0, "size")


def split_blocks(lay: Layout, m: int) -> Layout | None:
    """The layout where each new index holds m consecutive old ones (a view splitting the channel dim)."""
    r, u = lay.repeat, lay.unit
    if m % r == 0:
        new = replace(lay, repeat=1, unit=(m // r) * u)
    elif r % m == 0:
        new = replace(lay, repeat=r // m)
    else:
        return None
    pos = 0
    for s in lay.segments:  # a block may not straddle two producers' channels
        if pos % new.unit or s.length % new.unit:
            return None
        pos += s.length
    return new


def reshape(prop, node: fx.Node, rule: ChannelRule, module):
    x = first_input(node)
    lay, si, so = layout_of(prop, x), shape(x), shape(node)
    if lay is None:
        return None
    c = lay.dim
    before = math.prod(si[:c])
    found = [k for k in range(len(so)) if math.prod(so[:k]) == before]
    if not found or so[found[-1]] == 1 and si[c] != 1:
        fail(prop, node, f"mixes the channel dim with the dims before it ({si} -> {so})")
        return None
    k = found[-1]  # past any size-1 dim inserted before the channels
    spec = _shape_spec(node, rule)
    if spec is not None and len(spec) != len(so):
        fail(prop, node, f"reshapes to a computed shape {so}: dsd_fx cannot tell whether its channel entry would shrink")
        return None
    if so[k] >= si[c]:
        merged = so[k] // si[c]
        if so[k] % si[c] or merged not in {math.prod(si[c + 1:j]) for j in range(c + 1, len(si) + 1)}:
            fail(prop, node, f"splits the channel dim or mixes it with the dims before it ({si} -> {so})")
            return None
        new = Layout(k, lay.segments, lay.repeat * merged, lay.unit)
    else:
        new = split_blocks(lay, si[c] // so[k]) if si[c] % so[k] == 0 else None
        if new is None:
            fail(prop, node, f"splits the channel dim ({si} -> {so}) into blocks that cut across its channels' "
                             "producers or flattened blocks")
            return None
        new = replace(new, dim=k)
    path = _spec_path(node, rule, k, len(so))
    entry = literal_at(node, path)
    if isinstance(entry, fx.Node) and not size_of(prop, entry, new):
        fail(prop, node, f"reshapes with a size computed elsewhere ('{entry.name}') at the channel dim, which pruning "
                         "would not shrink; write -1 there")
        return None
    attach_literal(prop, node, new, path)
    return new


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
    return replace(lay, dim=new)


def cat(prop, node: fx.Node, rule: ChannelRule, module):
    tensors = list(arg_of(node, 0, "tensors"))
    n = len(shape(node))
    dim = int(arg_of(node, 1, "dim", 0)) % n
    lays = [layout_of(prop, t) for t in tensors]
    if all(lay is None for lay in lays):
        return None
    if any(lay is not None and lay.dim != dim for lay in lays):
        return elementwise(prop, node, rule, module)  # a cat along another dim ties its operands
    repeats = {(lay.repeat, lay.unit) for lay in lays if lay is not None}
    if len(repeats) > 1 or (None in lays and repeats != {(1, 1)}):
        fail(prop, node, "concatenates flattened or head-split channels of different block sizes")
        return None
    segments = []
    for t, lay in zip(tensors, lays):
        if lay is None:  # a part no prunable layer makes: a channel space that stays whole
            size = shape(t)[dim]
            atom = prop.state.atom(size, t.name)
            prop.state.blocked.setdefault(atom, []).append(f"node '{t.name}': not made by a prunable layer")
            lay = Layout(dim, (Segment(atom, 0, size),))
        segments.extend(lay.segments)
    repeat, unit = repeats.pop()
    return Layout(dim, tuple(segments), repeat, unit)


def _slice(lay: Layout, lo: int, hi: int) -> Layout:
    """Indices [lo, hi) of the channel dim (whole blocks of `unit` channels)."""
    lo, hi = lo * lay.unit, hi * lay.unit
    out, pos = [], 0
    for s in lay.segments:
        a, b = max(lo, pos), min(hi, pos + s.length)
        if a < b:
            out.append(Segment(s.atom, s.start + a - pos, b - a))
        pos += s.length
    return Layout(lay.dim, tuple(out), lay.repeat, lay.unit)


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
    sizes = arg_of(node, 1, "split_size_or_sections")
    for k, m in enumerate(metas):
        out.append(_slice(lay, lo, lo + m.shape[dim]))
        lo += m.shape[dim]
    if isinstance(sizes, (list, tuple)):  # the sections are literals: each follows its part's channels
        for k, part in enumerate(out):
            attach_literal(prop, node, part, (1, k))
        return tuple(out)
    if any(not tie(prop.state, out[0], p) for p in out[1:]):  # split(n) / chunk(n): the parts must stay equal
        fail(prop, node, "cuts the channel dim into equal parts by count, which pruning would unbalance; "
                         "split by a list of sizes (torch.split(x, [a, b], dim))")
        return None
    if node.target in (torch.split, "split", aten.split.Tensor):
        attach_literal(prop, node, out[0], (1,))
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
        if prop.hidden and keep:  # a norm's statistic (RMSNorm's mean of squares): over fewer channels
            return None
        fail(prop, node, "reduces over the channel dim" + ("" if prop.hidden else " (a norm's statistics? "
                                                            "hidden=True prunes through them)"))
        return None
    return replace(lay, dim=lay.dim if keep else lay.dim - sum(d < lay.dim for d in dims))


def layer_norm(prop, node: fx.Node, rule: ChannelRule, module):
    """LayerNorm / RMSNorm over the channel dim: with hidden=True its weight and bias follow the
    channels (and a functional call's literal normalized_shape); refused otherwise."""
    x = first_input(node)
    lay, si = layout_of(prop, x), shape(x)
    if lay is None:
        return None
    if not prop.hidden:
        fail(prop, node, f"{rule.reason}; hidden=True prunes these channels too (the statistics then run over fewer)")
        return None
    normalized = module.normalized_shape if module is not None else arg_of(node, 1, "normalized_shape")
    if len(normalized) != 1 or lay.dim != len(si) - 1 or lay.repeat != 1 or lay.unit != 1:
        fail(prop, node, f"normalises over {tuple(normalized)}, more than the channel dim")
        return None
    if module is not None:
        return attach_module_params(prop, node, lay, rule, module)
    for kw, k in (("weight", 2), ("bias", 3)):
        t = arg_of(node, k, kw)
        if isinstance(t, fx.Node):
            owner = tensor_attr(prop, t)
            if owner is None:
                fail(prop, node, f"its {kw} is not a parameter read by get_attr")
                return None
            prop.state.attach(lay, owner[0], owner[1], 0, "norm")
    attach_literal(prop, node, lay, (1, 0))
    return lay


def query(prop, node: fx.Node, rule: ChannelRule, module):
    return None  # a size, a dim count or an attribute: no channels flow on
