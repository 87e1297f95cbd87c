"""Which size expressions in a graph shrink with a tensor's channels (a reshape's computed entries)."""
from __future__ import annotations

import operator

import torch
from torch import fx

from dsd_fx.channels.layout import Layout


def size_of(prop, entry: fx.Node, lay: Layout) -> bool:
    """Whether `entry` reads a size that shrinks with `lay`'s channels: x.size(d) / x.shape[d] /
    sym_size(x, d) of a tensor x whose dim d holds the same channels (the same segments)."""
    if entry.target in (operator.mul, torch.ops.aten.mul.Tensor) and len(entry.args) == 2:  # repeat_kv: kv * n_rep
        nodes = [a for a in entry.args if isinstance(a, fx.Node)]
        return len(nodes) == 1 and any(isinstance(a, int) for a in entry.args) and size_of(prop, nodes[0], lay)
    src, dim = None, None
    if entry.target is torch.ops.aten.sym_size.int:
        src, dim = entry.args
    elif entry.target is operator.getitem and isinstance(entry.args[0], fx.Node):
        holder, dim = entry.args
        if holder.op == "call_method" and holder.target == "size" or holder.target is getattr and holder.args[1:] == ("shape",):
            src = holder.args[0]
    elif entry.op == "call_method" and entry.target == "size" and len(entry.args) == 2:
        src, dim = entry.args
    other = prop.layouts.get(src) if isinstance(src, fx.Node) else None
    if not isinstance(other, Layout):
        return False
    if not isinstance(dim, int):
        return False
    meta = src.meta.get("tensor_meta")
    return hasattr(meta, "shape") and other.dim == dim % len(meta.shape) and other.segments == lay.segments
