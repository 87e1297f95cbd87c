"""pack_nm: store N:M weights packed (kept values + index bits) and compute with a packed N:M op."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from dsd_fx.packing import pack_nm as pack_tensor
from dsd_fx.passes.functional import functionalize, get_attr, input_of
from dsd_fx.select import FUNCTION_OPS, PrunableWeight, is_direct
from dsd_fx.tags import tag, untagged_meta

PASS = "pack_nm"
PACKED_ATTR = "_dsd_fx_packed"  # on the owner module: attr -> what re-dense needs

def _linear_like(user: fx.Node, getter: fx.Node) -> tuple[fx.Node, fx.Node | None, tuple, dict] | None:
    """(x, bias, args template, kwargs template) if `user` computes x @ W.T-like with W = getter."""
    op = FUNCTION_OPS.get((user.op, user.target))
    row = op.packed if op is not None else None  # which ops take the packed kernel: select's table says
    if row is None or len(user.args) <= row["slot"] or user.args[row["slot"]] is not getter:
        return None
    if user.target is torch.addmm and user.kwargs:  # beta / alpha
        return None
    x = user.args[row["x"]]
    b = None
    if row["b"] is not None:
        b = user.args[row["b"]] if len(user.args) > row["b"] else user.kwargs.get(row.get("b_kw", ""))
    marks = {getter: "$W", x: "$x"}
    if isinstance(b, fx.Node):
        marks[b] = "$b"
    nodes = [a for a in (*user.args, *user.kwargs.values()) if isinstance(a, fx.Node)]
    if any(a not in marks for a in nodes) or list(user.args).count(getter) != 1:
        return None
    mark = lambda a: marks.get(a, a) if isinstance(a, fx.Node) else a  # noqa: E731
    return x, b, tuple(mark(a) for a in user.args), {k: mark(v) for k, v in user.kwargs.items()}


def pack_nm(gm: fx.GraphModule, weights: Sequence[tuple[PrunableWeight, int]], n: int, m: int) -> PassResult:
    """Replace each weight by `<name>_values` (trainable) and `<name>_meta` (index bits).

    Before::

        fc1 = self.fc1(x);  x = None

    After::

        fc1_weight_values = self.fc1.weight_values
        fc1_weight_meta = self.fc1.weight_meta
        fc1_bias = self.fc1.bias
        nm_linear = torch.ops.dsd_fx.nm_linear.default(x, fc1_weight_values, fc1_weight_meta, fc1_bias, 2, 4)

    Linear, F.linear, x @ W, mm and addmm become one `dsd_fx::nm_linear` op. Every other use
    (Conv, W @ x, any other read) gets the weight from `dsd_fx::nm_unpack`: packed storage, dense compute.
    """
    g = gm.graph
    linear_op, unpack_op = torch.ops.dsd_fx.nm_linear.default, torch.ops.dsd_fx.nm_unpack.default
    calls: dict[fx.Node, list] = {}  # module call -> [(parameter name in the module, weight, storage, unpacker)]
    for pw, dim in weights:
        path, _, attr = pw.name.rpartition(".")
        owner = gm.get_submodule(path) if path else gm
        values, meta = pack_tensor(pw.param, n, m, dim)
        owner.register_parameter(f"{attr}_values", nn.Parameter(values, requires_grad=pw.param.requires_grad))
        owner.register_buffer(f"{attr}_meta", meta)
        owner.__dict__.setdefault(PACKED_ATTR, {})[attr] = {
            "param": pw.param, "dim": dim, "shape": list(pw.param.shape), "n": n, "m": m,
            "order": list(owner._parameters),  # re-dense puts the parameter back in its place
        }
        del owner._parameters[attr]
        vname, mname = f"{pw.name}_values", f"{pw.name}_meta"

        def storage(g: fx.Graph, getter: str | None = None, vname=vname, mname=mname) -> tuple[fx.Node, fx.Node]:
            return tag(get_attr(g, vname), PASS, "values", getter=getter), tag(get_attr(g, mname), PASS, "meta")

        def unpacked(g: fx.Graph, getter: str | None, stored=None, storage=storage, pw=pw, dim=dim) -> fx.Node:
            v, mt = stored or storage(g)
            node = g.call_function(unpack_op, (v, mt, n, m, dim, list(pw.param.shape)))
            return tag(node, PASS, "unpacked", weight=pw.name, getter=getter)

        for getter in pw.getattrs:
            with g.inserting_before(getter.next):  # the packed storage is read where the weight was
                stored = storage(g, getter.name)
            dense = None
            for user in list(getter.users):
                if user in stored:
                    continue
                found = _linear_like(user, getter)
                if found is None:
                    if dense is None:
                        with g.inserting_before(stored[1].next):
                            dense = unpacked(g, getter.name, stored)
                    user.replace_input_with(getter, dense)
                    continue
                x, b, args, kwargs = found
                v, mt = stored
                with g.inserting_before(user):
                    new = g.call_function(linear_op, (x, v, mt, b, n, m))
                tag(new, PASS, "packed_op", weight=pw.name, getter=getter.name, op=user.op, target=user.target,
                    args=args, kwargs=kwargs, name=user.name, meta=untagged_meta(user))
                user.replace_all_uses_with(new)
                g.erase_node(user)
            g.erase_node(getter)
        for use in pw.uses:
            if use.node.op == "call_module":
                calls.setdefault(use.node, []).append((use.param, pw, storage, unpacked))
    for call, wrapped in calls.items():
        module = gm.get_submodule(call.target)
        if isinstance(module, nn.Linear) and is_direct(module):
            ((_, pw, storage, _),) = wrapped
            with g.inserting_before(call):
                v, mt = storage(g)
                b = tag(get_attr(g, f"{call.target}.bias"), PASS, "bias") if module.bias is not None else None
                new = g.call_function(linear_op, (input_of(call), v, mt, b, n, m))
            tag(new, PASS, "packed_op", weight=pw.name, module=call.target, name=call.name, meta=untagged_meta(call))
            call.replace_all_uses_with(new)
            g.erase_node(call)
        else:  # Conv, LSTM, attention, ...: packed storage, dense compute

            def dense_weights(g: fx.Graph, wrapped=wrapped) -> dict[str, fx.Node]:
                return {name: unpacked(g, None) for name, _, _, unpacked in wrapped}

            functionalize(gm, call, dense_weights, PASS)
    return PassResult(gm, modified=bool(weights))
