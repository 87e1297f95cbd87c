"""strip_masks: the inverse of insert_masks and insert_nm; gives back the original dense ops."""
from __future__ import annotations

import copy

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from dsd_fx.ops import module_call
from dsd_fx.tags import Role, tag_of, tagged, untagged_meta

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
    mask_buffers = {n.target for n in tagged(old, role=Role.MASK_BUFFER)}
    if next(tagged(old), None) is None:
        return PassResult(gm, modified=False)
    new = fx.Graph(owning_module=gm, tracer_cls=old._tracer_cls)
    new._codegen = copy.deepcopy(old._codegen)
    env: dict[fx.Node, fx.Node] = {}
    made: list[fx.Node] = []  # copies of tagged nodes, erased if nothing uses them

    by_name = {n.name: n for n in old.nodes}

    def arg(n):
        return env[n]

    for node in old.nodes:
        t = tag_of(node)
        role = t["role"] if t else None
        if role in (Role.LAYER, Role.HELPER):  # the restored module call reads its layer and input itself
            continue
        if role == Role.MASKED_WEIGHT:  # mask_mul / sparsify_nm: the weight itself stands in
            env[node] = env[node.args[0]]
        elif role == Role.RESTORED:  # a node unpack_nm gave back: keep it, under its original name
            env[node] = new.create_node(node.op, node.target, *fx.node.map_arg((node.args, node.kwargs), arg), name=t["name"])
            env[node].meta = untagged_meta(node)
        elif role == Role.OP:
            if node.target is module_call:  # module_call(layer, names, weights, args, kwargs)
                args, kwargs = fx.node.map_arg((node.args[3], node.args[4]), arg)
            else:  # a functional form of (input, weight, bias)
                args, kwargs = (env[by_name[t["input"]]],), {}
            restored = new.create_node("call_module", t["module"], tuple(args), dict(kwargs), name=t["name"])
            restored.meta = dict(t["meta"])
            env[node] = restored
        else:
            env[node] = new.node_copy(node, arg)
            if role is not None:
                env[node].meta.pop("dsd_fx", None)
                made.append(env[node])
    for n in reversed(made):
        if not n.users:
            new.erase_node(n)
    gm.graph = new
    for qualname in mask_buffers:
        path, _, attr = qualname.rpartition(".")
        owner = gm.get_submodule(path) if path else gm
        if attr in owner._buffers:
            del owner._buffers[attr]
    return PassResult(gm, modified=True)
