"""How attention moves channel layouts: heads through sdpa, q @ k^T, softmax, attn @ v, repeat_kv."""
from __future__ import annotations

import operator
from dataclasses import replace

import torch
from torch import fx

from dsd_fx.channels.layout import Layout, Member, Segment
from dsd_fx.channels.rules import arg_of, attach_literal, fail, first_input, layout_of, shape, tie
from dsd_fx.op_table import ChannelRule

aten = torch.ops.aten


def _tie_all(prop, node: fx.Node, lays: list[Layout], why: str) -> bool:
    for other in lays[1:]:
        if other.dim != lays[0].dim or not tie(prop.state, lays[0], other):
            fail(prop, node, why)
            return False
    return True


def attention(prop, node: fx.Node, rule: ChannelRule, module):
    """scaled_dot_product_attention(q, k, v, attn_mask, ..., enable_gqa): q's, k's and v's heads
    (dim -3) tie one to one, or, with enable_gqa, each KV head to the Hq / Hkv query heads after
    it; the output's heads are v's (its last dim is v's head_dim)."""
    q, k, v = (arg_of(node, i, kw) for i, kw in enumerate(("query", "key", "value")))
    mask = arg_of(node, 3, "attn_mask")
    gqa = bool(arg_of(node, 7, "enable_gqa", False))
    lq, lk, lv = (layout_of(prop, t) for t in (q, k, v))
    if lq is None and lk is None and lv is None:
        return None
    sq, sk = shape(q), shape(k)
    if any(lay is None for lay in (lq, lk, lv)):
        fail(prop, node, "attends over channels that only some of query, key and value carry")
        return None
    if any(lay.dim != len(shape(t)) - 3 for lay, t in ((lq, q), (lk, k), (lv, v))):
        fail(prop, node, "attention's operands carry channels outside their heads dim (-3)")
        return None
    n_rep = sq[-3] // sk[-3] if gqa else 1
    lk, lv = (replace(lay, repeat=lay.repeat * n_rep) for lay in (lk, lv))
    if not _tie_all(prop, node, [lq, lk, lv], "query, key and value heads cannot be matched one to one"):
        return None
    if isinstance(mask, fx.Node):
        lm, sm = layout_of(prop, mask), shape(mask)
        if lm is not None and not _tie_all(prop, node, [replace(lq, dim=lm.dim), lm], "the mask's heads are not the query's"):
            return None
        if lm is None and sm is not None and len(sm) >= 3 and sm[-3] != 1:
            fail(prop, node, f"its attention mask '{mask.name}' carries {sm[-3]} heads that dsd_fx does not track")
            return None
    return replace(lv, dim=len(shape(node)) - 3)


def matmul(prop, node: fx.Node, a: fx.Node, b: fx.Node):
    """a @ b of two activations: channels on batch dims (heads) tie; channels contracted (a's
    last dim, b's second last) tie; a's rows or b's columns pass to the output."""
    la, lb, sa, sb, so = layout_of(prop, a), layout_of(prop, b), shape(a), shape(b), shape(node)
    if la is None and lb is None:
        return None
    if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
        fail(prop, node, "a matmul of vectors or of tensors without shapes")
        return None
    wa = None if la is None else la.dim - len(sa)  # where the channels are, counted from the end
    wb = None if lb is None else lb.dim - len(sb)
    if wa == -1 or wb == -2:  # contracted: both sides or neither
        if wa != -1 or wb != -2 or not tie(prop.state, la, replace(lb, dim=la.dim)):
            fail(prop, node, "contracts channels that its other operand does not carry one to one")
        return None
    batch = min(w for w in (wa, wb) if w is not None)
    if batch <= -3:  # heads: the other operand carries the same heads or broadcasts
        for lay, s, w in ((la, sa, wa), (lb, sb, wb)):
            if w is not None and w != batch:
                fail(prop, node, "its output would carry channels on two dims")
                return None
            if w is None and len(s) >= -batch and s[batch] != 1:
                fail(prop, node, f"multiplies head-split channels by an operand whose {s[batch]} heads dsd_fx does not track")
                return None
        if la is not None and lb is not None and not tie(prop.state, la, replace(lb, dim=la.dim)):
            fail(prop, node, "its operands' heads cannot be matched one to one")
            return None
        return replace(lb if lb is not None else la, dim=len(so) + batch)
    if wa is not None and wb is not None:  # a's rows and b's columns: two channel dims in one tensor
        fail(prop, node, "its output would carry channels on two dims")
        return None
    return replace(la, dim=len(so) - 2) if la is not None else replace(lb, dim=len(so) - 1)


def softmax(prop, node: fx.Node, rule: ChannelRule, module):
    """softmax / log_softmax along a dim: the channels pass unless they are the normalised dim."""
    x = first_input(node)
    lay = layout_of(prop, x)
    if lay is None:
        return None
    dim = arg_of(node, 1, "dim")
    if dim is None or int(dim) % len(shape(x)) == lay.dim:
        fail(prop, node, "normalises over the channel dim: removing a channel changes every other channel's share")
        return None
    return lay


def expand(prop, node: fx.Node, rule: ChannelRule, module):
    """x.expand(sizes): new leading dims; the channel dim must keep its size (its literal follows)."""
    x = first_input(node)
    lay, si, so = layout_of(prop, x), shape(x), shape(node)
    if lay is None:
        return None
    new = replace(lay, dim=lay.dim + len(so) - len(si))
    if so[new.dim] != si[lay.dim]:
        fail(prop, node, "broadcasts the channel dim")
        return None
    packed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
    attach_literal(prop, node, new, (1, new.dim) if packed else (1 + new.dim,))
    return new


def repeat_interleave(prop, node: fx.Node, rule: ChannelRule, module):
    """repeat_interleave(x, n, dim): along the channel dim each block is read n times (a KV head
    for the n query heads after it); elsewhere the channels pass."""
    x = first_input(node)
    lay, si = layout_of(prop, x), shape(x)
    if lay is None:
        return None
    n, dim = arg_of(node, 1, "repeats"), arg_of(node, 2, "dim")
    if not isinstance(n, int) or dim is None:
        fail(prop, node, "repeat_interleave without an int count and a dim")
        return None
    return replace(lay, repeat=lay.repeat * n) if int(dim) % len(si) == lay.dim else lay


def index(prop, node: fx.Node, rule: ChannelRule, module):
    """getitem: one output of a multi-output op (an LSTM's, a split's) takes that output's
    channels; a tensor indexed by slices, None and Ellipsis keeps its channels where the index
    puts their dim (repeat_kv's x[:, :, None], rotary's x[..., :d // 2])."""
    src, i = node.args
    lay = prop.layouts.get(src)
    if isinstance(lay, tuple) and isinstance(i, int):
        return lay[i]
    if isinstance(lay, Layout):
        return _index_tensor(prop, node, lay, i)
    return None


def _index_tensor(prop, node: fx.Node, lay: Layout, index) -> Layout | None:
    """x[...]: a slice of the channel dim is refused (a range of heads or channels would need its
    bounds rewritten)."""
    si = shape(first_input(node))
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, fx.Node) or not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items):
        fail(prop, node, "indexes with tensors")
        return None
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (len(si) - used)
    items += [slice(None)] * (len(si) - sum(1 for i in items if i is not None))
    d_in = d_out = 0
    for i in items:
        if i is None:
            d_out += 1
            continue
        if d_in == lay.dim:
            if not (isinstance(i, slice) and i == slice(None)):
                fail(prop, node, "indexes or slices the channel dim")
                return None
            return replace(lay, dim=d_out)
        d_in += 1
        d_out += 0 if isinstance(i, int) else 1
    return None


def multihead_attention(prop, node: fx.Node, rule: ChannelRule, module):
    """nn.MultiheadAttention: its heads are one channel space, num_heads units of head_dim: the
    rows of in_proj_weight (and in_proj_bias) at offsets 0, E and 2E (Q, K, V) and the columns
    of out_proj; its input (self-attention: query is key is value) is in_proj_weight's columns;
    its output a new channel space, out_proj's rows. The output (attn_output, attn_weights)."""
    q, k, v = (arg_of(node, i, kw) for i, kw in enumerate(("query", "key", "value")))
    mask = arg_of(node, 5, "attn_mask")
    why = ("its Q, K and V weights are separate (kdim / vdim)" if not module._qkv_same_embed_dim
           else "bias_k / bias_v or add_zero_attn" if module.bias_k is not None or module.add_zero_attn
           else "a 3-d attn_mask (one per head)" if isinstance(mask, fx.Node) and len(shape(mask) or ()) == 3 else "")
    if why:
        fail(prop, node, f"nn.MultiheadAttention with {why}: dsd_fx does not prune its heads")
        return None
    lay, si = layout_of(prop, q), shape(q)
    if lay is not None and (q is not k or k is not v):
        fail(prop, node, "cross-attention reads its input channels through in_proj_weight's columns for Q and K/V alike")
        lay = None
    if lay is not None and lay.dim != len(si) - 1:
        fail(prop, node, f"nn.MultiheadAttention consumes dim {len(si) - 1}, but the channels are at dim {lay.dim}")
        lay = None
    if lay is not None:
        prop.state.attach(lay, node.target, "in_proj_weight", 1, "in")
    inner, h = module.in_proj_weight.shape[0] // 3, module.num_heads  # embed_dim, or less once pruned
    heads = prop.state.atom(inner, node.target)
    prop.state.ties.append((heads, heads, h))  # whole heads only
    if any(u.target is operator.getitem and u.args[1] == 1 and u.users for u in node.users):
        prop.state.blocked.setdefault(heads, []).append(
            f"node '{node.name}': its attention weights (averaged over the heads) are used")
    tensors = ["in_proj_weight"] + (["in_proj_bias"] if module.in_proj_bias is not None else [])
    for tensor in tensors:
        for part in range(3):
            prop.state.members.append((heads, Member(node.target, tensor, 0, "out", part * inner, 0, inner)))
    prop.state.members.append((heads, Member(f"{node.target}.out_proj", "weight", 1, "in", 0, 0, inner)))
    e = module.out_proj.out_features
    out = prop.state.atom(e, f"{node.target}.out_proj")
    for tensor in ("weight", "bias") if module.out_proj.bias is not None else ("weight",):
        prop.state.members.append((out, Member(f"{node.target}.out_proj", tensor, 0, "out", 0, 0, e)))
    return Layout(len(si) - 1, (Segment(out, 0, e),)), None


def slice_(prop, node: fx.Node, rule: ChannelRule, module):
    """aten.slice(x, dim, start, end, step) / aten.select(x, dim, index): along another dim the
    channels pass (select drops its dim); a whole-dim slice of the channel dim passes; a part of it
    is refused."""
    x = first_input(node)
    lay, si = layout_of(prop, x), shape(x)
    if lay is None:
        return None
    dim = int(arg_of(node, 1, "dim", 0)) % len(si)
    if node.target is aten.select.int:
        if dim == lay.dim:
            fail(prop, node, "selects one index of the channel dim")
            return None
        return replace(lay, dim=lay.dim - (dim < lay.dim))
    if dim == lay.dim and shape(node)[dim] != si[dim]:
        fail(prop, node, "slices the channel dim")
        return None
    return lay
