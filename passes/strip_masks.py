"""strip_masks: the inverse of insert_masks and insert_nm; gives back the original dense ops."""
from __future__ import annotations

import copy

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from dsd_fx.ops import module_call
from dsd_fx.infra.rewrite import owner_of
from dsd_fx.passes.insert_masks import PASS as INSERT_MASKS
from dsd_fx.passes.insert_nm import PASS as INSERT_NM
from dsd_fx.passes.pack_nm import PASS as PACK_NM
from dsd_fx.passes.unpack_nm import PASS as UNPACK_NM
from dsd_fx.tags import META_KEY, Role, tag_of, tagged, untagged_meta

# the passes whose nodes strip_masks removes (unpack_nm's restored nodes keep their place)
PASS = "strip_masks"
PASSES = (INSERT_MASKS, INSERT_NM, PACK_NM, UNPACK_NM)  # the passes whose nodes it removes


def strip_masks(gm: fx.GraphModule) -> PassResult:
    """Remove every node and buffer that insert_masks or insert_nm made; restore the module calls.

    Before::

        fc1_weight = self.fc1.weight
        fc1_weight_mask = self.fc1.weight_mask
        mask_mul = dsd_fx_ops_mask_mul(fc1_weight, fc1_weight_mask, grad_inplace = True)
        fc1_bias = self.fc1.bias
        linear = torch._C._nn.linear(x, mask_mul, fc1_bias)
        relu = torch.relu(linear)

    After::

        fc1 = self.fc1(x);  x = None
        relu = torch.relu(fc1)

    It rebuilds the graph node by node so that restored nodes get their original names back and
    the generated code equals the code of the never-sparsified model. It does not touch weight
    values: writing W * M into the weights is the caller's (transform's) commit step.
    """
    old = gm.graph
    mine = [n for n in tagged(old) if tag_of(n)["pass"] in PASSES]
    if not mine:
        return PassResult(gm, modified=False)
    mask_buffers = {n.target for n in mine if tag_of(n)["role"] == Role.MASK_BUFFER}
    new = fx.Graph(owning_module=gm, tracer_cls=old._tracer_cls)
    new._codegen = copy.deepcopy(old._codegen)
    env: dict[fx.Node, fx.Node] = {}
    made: list[fx.Node] = []  # copies of nodes these passes made (weight and bias reads), erased if unused
    for node in old.nodes:
        t = tag_of(node)
        if t is None or t["pass"] not in PASSES:  # not ours: copied as it is, tag included
            env[node] = new.node_copy(node, env.__getitem__)
            continue
        restored = _restore(new, node, t, env)
        if restored is not None:
            env[node] = restored
        elif t["role"] not in (Role.LAYER, Role.HELPER):  # the restored module call reads those itself
            env[node] = new.node_copy(node, env.__getitem__)
            env[node].meta.pop(META_KEY, None)
            made.append(env[node])
    for n in reversed(made):
        if not n.users:
            new.erase_node(n)
    gm.graph = new
    for qualname in mask_buffers:
        owner, attr = owner_of(gm, qualname)
        if attr in owner._buffers:
            del owner._buffers[attr]
    return PassResult(gm, modified=True)


def _restore(new: fx.Graph, node: fx.Node, t: dict, env: dict) -> fx.Node | None:
    """The node of the dense graph that stands for `node`, or None where it is copied or dropped."""
    role = t["role"]
    if role == Role.MASKED_WEIGHT:  # mask_mul / sparsify_nm: the weight itself stands in
        return env[node.args[0]]
    if role == Role.RESTORED:  # a node unpack_nm gave back: keep it, under its original name
        restored = new.create_node(node.op, node.target, *fx.node.map_arg((node.args, node.kwargs), env.__getitem__), name=t["name"])
        restored.meta = untagged_meta(node)
        return restored
    if role != Role.OP:
        return None
    if node.target is module_call:  # module_call(layer, names, weights, args, kwargs)
        args, kwargs = fx.node.map_arg((node.args[3], node.args[4]), env.__getitem__)
    else:  # a functional form of (input, weight, bias); its input may pass through helpers (a pad)
        x = node.args[0]
        while (xt := tag_of(x)) is not None and xt["role"] == Role.HELPER:
            x = x.args[0]
        args, kwargs = (env[x],), {}
    restored = new.create_node("call_module", t["module"], tuple(args), dict(kwargs), name=t["name"])
    restored.meta = dict(t["meta"])
    return restored
