"""unpack_nm: the inverse of pack_nm; packed ops become dense ops on the original parameter again."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from dsd_fx.infra.rewrite import get_attr, owner_of
from dsd_fx.passes.pack_nm import PASS as PACK_NM
from dsd_fx.state import MaskKind, MaskRecord
from dsd_fx.tags import Role, tag, tag_of, tagged

PASS = "unpack_nm"


def unpack_nm(gm: fx.GraphModule, records: Sequence[MaskRecord]) -> PassResult:
    """Put each packed weight back under its original name and its ops back to dense form.

    Before::

        fc1_weight_values = self.fc1.weight_values
        fc1_weight_meta = self.fc1.weight_meta
        fc1_bias = self.fc1.bias
        nm_linear = torch.ops.dsd_fx.nm_linear.default(x, fc1_weight_values, fc1_weight_meta, fc1_bias, 2, 4)

    After (strip_masks then restores the module call ``fc1 = self.fc1(x)``)::

        fc1_weight = self.fc1.weight
        fc1_bias = self.fc1.bias
        linear = torch._C._nn.linear(x, fc1_weight, fc1_bias)

    `records` are the graph's MaskRecords (state.masks_of); the parameter registered again is the
    packed record's *original* Parameter object, into which transform's commit step writes the
    unpacked values.
    """
    g = gm.graph
    packed = [n for n in tagged(g, PACK_NM) if tag_of(n)["role"] in (Role.PACKED_OP, Role.UNPACKED)]
    if not packed:
        return PassResult(gm, modified=False)
    getters: dict[str, fx.Node] = {}  # original get_attr name -> its restored node
    stored_at = {tag_of(n)["getter"]: n for n in tagged(g, PACK_NM, Role.PACKED_VALUES) if tag_of(n).get("getter")}

    def getter_for(t: dict) -> fx.Node:
        if t["getter"] not in getters:  # restored where the packed storage was read
            stored = stored_at[t["getter"]]
            with g.inserting_before(stored):  # by the name it was read by (a tied weight: head.weight, not wte.weight)
                read = tag_of(stored).get("read") or t["weight"]
                getters[t["getter"]] = tag(get_attr(g, read), PASS, Role.RESTORED, name=t["getter"])
        return getters[t["getter"]]

    for node in packed:
        t = tag_of(node)
        with g.inserting_before(node):
            if t["role"] == Role.UNPACKED:
                new = getter_for(t) if t["getter"] else tag(get_attr(g, t["weight"]), PASS, Role.WEIGHT)
            elif "module" in t:
                x, b = node.args[0], node.args[3]  # nm_linear(x, values, meta, bias, n, m[, impl])
                w = tag(get_attr(g, t["weight"]), PASS, Role.WEIGHT)
                new = tag(g.call_function(F.linear, (x, w, b)), PASS, Role.OP, module=t["module"], name=t["name"], meta=t["meta"])
            else:
                x, b = node.args[0], node.args[3]  # nm_linear(x, values, meta, bias, n, m[, impl])
                marks = {"$x": x, "$b": b, "$W": getter_for(t)}
                fill = lambda a: marks[a] if isinstance(a, str) and a in marks else a  # noqa: E731
                args = tuple(fill(a) for a in t["args"])
                kwargs = {k: fill(v) for k, v in t["kwargs"].items()}
                new = tag(g.create_node(t["op"], t["target"], args, kwargs), PASS, Role.RESTORED, name=t["name"])
                new.meta.update(t["meta"])
        node.replace_all_uses_with(new)
        g.erase_node(node)
    for node in list(tagged(g, PACK_NM)):
        if tag_of(node)["role"] in (Role.PACKED_VALUES, Role.PACKED_META) and not node.users:
            g.erase_node(node)
    for r in records:
        if r.kind is MaskKind.PACKED:
            _restore_parameter(gm, r)
    return PassResult(gm, modified=True)


def _restore_parameter(gm: fx.GraphModule, r: MaskRecord) -> None:
    """The original Parameter back under its name, in its place among the module's parameters
    (hence of state_dict keys); the packed storage goes."""
    module, attr = owner_of(gm, r.weight)
    del module._parameters[f"{attr}_values"]
    del module._buffers[f"{attr}_meta"]
    module._parameters[attr] = r.param
    params = dict(module._parameters)
    module._parameters.clear()
    module._parameters.update({k: params.pop(k) for k in r.order if k in params})
    module._parameters.update(params)
