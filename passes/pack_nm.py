"""pack_nm: store N:M weights packed (kept values + index bits) and compute with a packed N:M op."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from dsd_fx.op_table import module_row, packed_call
from dsd_fx.sparse.packing import pack_tensor
from dsd_fx.sparse.prunable import PrunableWeight
from dsd_fx.infra.rewrite import functionalize, get_attr, input_of, owner_of
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
    packer = _Packer(n, m, () if kernel == "auto" else (kernel,))
    calls: dict[fx.Node, list[tuple[str, _Weight]]] = {}  # module call -> [(parameter name in the module, weight)]
    for pw, dim in weights:
        owner, attr = owner_of(gm, pw.name)
        values, meta = pack_tensor(pw.param, n, m, dim)
        owner.register_parameter(f"{attr}_values", nn.Parameter(values, requires_grad=pw.param.requires_grad))
        owner.register_buffer(f"{attr}_meta", meta)
        del owner._parameters[attr]  # the record (state.MaskRecord) keeps the Parameter for re-dense
        w = _Weight(packer, pw, dim)
        for getter in pw.getattrs:
            w.rewrite_reads(gm.graph, getter)
        for use in pw.uses:
            if use.node.op == "call_module":
                calls.setdefault(use.node, []).append((use.param, w))
    for call, wrapped in calls.items():
        packer.rewrite_call(gm, call, wrapped)
    return PassResult(gm, modified=bool(weights))


@dataclass(frozen=True)
class _Packer:
    n: int
    m: int
    impl: tuple  # () for "auto", else (kernel,): nm_linear's last argument, `impl`

    def linear(self, g: fx.Graph, x, storage: tuple[fx.Node, fx.Node], bias) -> fx.Node:
        return g.call_function(torch.ops.dsd_fx.nm_linear.default, (x, *storage, bias, self.n, self.m, *self.impl))

    def rewrite_call(self, gm: fx.GraphModule, call: fx.Node, wrapped: list[tuple[str, "_Weight"]]) -> None:
        """A module call reading packed weights: nm_linear for a Linear, else its functional form
        (Conv, LSTM, attention, ...) over the unpacked weights: packed storage, dense compute."""
        g = gm.graph
        module = gm.get_submodule(call.target)
        row = module_row(module)
        if row is None or row.functional is None or row.packed is None:
            functionalize(gm, call, lambda g: {name: w.unpacked(g, None) for name, w in wrapped}, PASS)
            return
        ((_, w),) = wrapped
        with g.inserting_before(call):
            storage = w.storage(g)
            b = tag(get_attr(g, f"{call.target}.bias"), PASS, Role.BIAS) if module.bias is not None else None
            new = self.linear(g, input_of(call), storage, b)
        tag(new, PASS, Role.PACKED_OP, weight=w.pw.name, module=call.target, name=call.name, meta=untagged_meta(call))
        call.replace_all_uses_with(new)
        g.erase_node(call)


@dataclass(frozen=True)
class _Weight:
    packer: _Packer
    pw: PrunableWeight
    dim: int

    def storage(self, g: fx.Graph, getter: str | None = None, read: str | None = None) -> tuple[fx.Node, fx.Node]:
        # read: the name the replaced get_attr read the weight by (a tied weight has several), restored by unpack_nm
        name = self.pw.name
        return (tag(get_attr(g, f"{name}_values"), PASS, Role.PACKED_VALUES, getter=getter, read=read),
                tag(get_attr(g, f"{name}_meta"), PASS, Role.PACKED_META))

    def unpacked(self, g: fx.Graph, getter: str | None, stored: tuple | None = None) -> fx.Node:
        p = self.packer
        node = g.call_function(torch.ops.dsd_fx.nm_unpack.default, (*(stored or self.storage(g)), p.n, p.m, self.dim, list(self.pw.param.shape)))
        return tag(node, PASS, Role.UNPACKED, weight=self.pw.name, getter=getter)

    def rewrite_reads(self, g: fx.Graph, getter: fx.Node) -> None:
        """A get_attr of the weight: the packed storage is read where the weight was; each
        linear-like user becomes nm_linear, every other user reads the unpacked weight."""
        with g.inserting_before(getter.next):
            stored = self.storage(g, getter.name, getter.target)
        dense = None
        for user in list(getter.users):
            if user in stored:
                continue
            found = packed_call(user, getter)
            if found is None:
                if dense is None:
                    with g.inserting_before(stored[1].next):
                        dense = self.unpacked(g, getter.name, stored)
                user.replace_input_with(getter, dense)
                continue
            with g.inserting_before(user):
                new = self.packer.linear(g, found.x, stored, found.bias)
            tag(new, PASS, Role.PACKED_OP, weight=self.pw.name, getter=getter.name, op=user.op, target=user.target,
                args=found.args, kwargs=found.kwargs, name=user.name, meta=untagged_meta(user))
            user.replace_all_uses_with(new)
            g.erase_node(user)
        g.erase_node(getter)
