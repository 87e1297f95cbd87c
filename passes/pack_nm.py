"""pack_nm: store N:M weights packed (kept values + index bits) and compute with a packed N:M op."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from dsd_fx.op_table import module_row, packed_call
from dsd_fx.packing import pack_nm as pack_tensor
from dsd_fx.prunable import PrunableWeight
from dsd_fx.rewrite import functionalize, get_attr, input_of
from dsd_fx.tags import Role, tag, untagged_meta

PASS = "pack_nm"


def pack_nm(gm: fx.GraphModule, weights: Sequence[tuple[PrunableWeight, int]], n: int, m: int, kernel: str = "auto") -> PassResult:
    """Replace each weight by `<name>_values` (trainable) and `<name>_meta` (index bits).

    Before::

        fc1 = self.fc1(x);  x = None

    After::

        fc1_weight_values = self.fc1.weight_values
        fc1_weight_meta = self.fc1.weight_meta
        fc1_bias = self.fc1.bias
        nm_linear = torch.ops.dsd_fx.nm_linear.default(x, fc1_weight_values, fc1_weight_meta, fc1_bias, 2, 4)

    The ops whose op_table row has a `packed` form (Linear, F.linear, x @ W, mm, addmm) become one
    `dsd_fx::nm_linear` op. Every other use
    (Conv, W @ x, any other read) gets the weight from `dsd_fx::nm_unpack`: packed storage, dense compute.
    `kernel` ("auto" or "dense") is the packed op's kernel choice (SparseConfig.kernel).
    """
    choice = () if kernel == "auto" else (kernel,)
    g = gm.graph
    linear_op, unpack_op = torch.ops.dsd_fx.nm_linear.default, torch.ops.dsd_fx.nm_unpack.default
    calls: dict[fx.Node, list] = {}  # module call -> [(parameter name in the module, weight, storage, unpacker)]
    for pw, dim in weights:
        path, _, attr = pw.name.rpartition(".")
        owner = gm.get_submodule(path) if path else gm
        values, meta = pack_tensor(pw.param, n, m, dim)
        owner.register_parameter(f"{attr}_values", nn.Parameter(values, requires_grad=pw.param.requires_grad))
        owner.register_buffer(f"{attr}_meta", meta)
        del owner._parameters[attr]  # the record (state.MaskRecord) keeps the Parameter for re-dense
        vname, mname = f"{pw.name}_values", f"{pw.name}_meta"

        def storage(g: fx.Graph, getter: str | None = None, vname=vname, mname=mname) -> tuple[fx.Node, fx.Node]:
            return tag(get_attr(g, vname), PASS, Role.PACKED_VALUES, getter=getter), tag(get_attr(g, mname), PASS, Role.PACKED_META)

        def unpacked(g: fx.Graph, getter: str | None, stored=None, storage=storage, pw=pw, dim=dim) -> fx.Node:
            v, mt = stored or storage(g)
            node = g.call_function(unpack_op, (v, mt, n, m, dim, list(pw.param.shape)))
            return tag(node, PASS, Role.UNPACKED, weight=pw.name, getter=getter)

        for getter in pw.getattrs:
            with g.inserting_before(getter.next):  # the packed storage is read where the weight was
                stored = storage(g, getter.name)
            dense = None
            for user in list(getter.users):
                if user in stored:
                    continue
                found = packed_call(user, getter)
                if found is None:
                    if dense is None:
                        with g.inserting_before(stored[1].next):
                            dense = unpacked(g, getter.name, stored)
                    user.replace_input_with(getter, dense)
                    continue
                v, mt = stored
                with g.inserting_before(user):
                    new = g.call_function(linear_op, (found.x, v, mt, found.bias, n, m, *choice))
                tag(new, PASS, Role.PACKED_OP, weight=pw.name, getter=getter.name, op=user.op, target=user.target,
                    args=found.args, kwargs=found.kwargs, name=user.name, meta=untagged_meta(user))
                user.replace_all_uses_with(new)
                g.erase_node(user)
            g.erase_node(getter)
        for use in pw.uses:
            if use.node.op == "call_module":
                calls.setdefault(use.node, []).append((use.param, pw, storage, unpacked))
    for call, wrapped in calls.items():
        module = gm.get_submodule(call.target)
        row = module_row(module)
        if row is not None and row.functional is not None and row.packed is not None:  # nn.Linear
            ((_, pw, storage, _),) = wrapped
            with g.inserting_before(call):
                v, mt = storage(g)
                b = tag(get_attr(g, f"{call.target}.bias"), PASS, Role.BIAS) if module.bias is not None else None
                new = g.call_function(linear_op, (input_of(call), v, mt, b, n, m, *choice))
            tag(new, PASS, Role.PACKED_OP, weight=pw.name, module=call.target, name=call.name, meta=untagged_meta(call))
            call.replace_all_uses_with(new)
            g.erase_node(call)
        else:  # Conv, LSTM, attention, ...: packed storage, dense compute

            def dense_weights(g: fx.Graph, wrapped=wrapped) -> dict[str, fx.Node]:
                return {name: unpacked(g, None) for name, _, _, unpacked in wrapped}

            functionalize(gm, call, dense_weights, PASS)
    return PassResult(gm, modified=bool(weights))
