"""The graph surgery the passes share: module calls made functional over given weight nodes."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import fx, nn

from dsd_fx.op_table import module_row
from dsd_fx.ops import module_call
from dsd_fx.tags import Role, tag, untagged_meta


def owner_of(root: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    """(the module that holds `qualname`, the attribute's own name): "fc1.weight" -> (root.fc1, "weight")."""
    path, _, attr = qualname.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


def get_attr(g: fx.Graph, target: str) -> fx.Node:
    # selection has checked that the attribute exists; Graph.get_attr would look it up again
    return g.create_node("get_attr", target)


def input_of(node: fx.Node) -> fx.Node:
    return node.args[0] if node.args else node.kwargs["input"]


def functionalize(
    gm: fx.GraphModule, node: fx.Node, weights: Callable[[fx.Graph], dict[str, fx.Node]], pass_name: str
) -> fx.Node:
    """Replace `call_module` `node` by a functional call that reads `weights(graph)`, a dict from
    parameter name inside the module ("weight", "weight_hh_l0", ...) to the node to use instead.

    Linear, Conv* and ConvTranspose* become F.linear / F.conv* of (input, weight, bias); every other
    layer (LSTM, MultiheadAttention, TransformerEncoderLayer, Embedding, ...) becomes
    `dsd_fx.ops.module_call(module, names, weights, args, kwargs)`, the layer's own forward with
    those parameters swapped in. The new op is tagged role "op" with what strip_masks needs to
    restore the module call.
    """
    g = gm.graph
    module = gm.get_submodule(node.target)
    row = module_row(module)
    build = row.functional if row is not None else None
    with g.inserting_before(node):
        ws = weights(g)
        if build is not None:
            b = tag(get_attr(g, f"{node.target}.bias"), pass_name, Role.BIAS) if module.bias is not None else None
            x = input_of(node)
            op = build(g, module, x, ws["weight"], b)
            for helper in _between(x, op):  # an explicit pad: re-dense drops it with the op
                tag(helper, pass_name, Role.HELPER)
        else:
            layer = tag(get_attr(g, node.target), pass_name, Role.LAYER)
            op = g.call_function(module_call, (layer, tuple(ws), tuple(ws.values()), node.args, node.kwargs))
    tag(op, pass_name, Role.OP, module=node.target, name=node.name, meta=untagged_meta(node))
    op.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    node.replace_all_uses_with(op)
    g.erase_node(node)
    return op


def _between(x: fx.Node, op: fx.Node) -> list[fx.Node]:
    """The nodes a functional builder made between the module's input `x` and its op."""
    out, node = [], op.prev
    while node is not x and node.op == "call_function" and x in node.all_input_nodes:
        out.append(node)
        node = node.prev
    return out


def wrap_weight_uses(
    gm: fx.GraphModule, items: Sequence[tuple[Any, Callable[[fx.Graph, fx.Node, bool], fx.Node]]], pass_name: str
) -> None:
    """Feed every use of each parameter through its wrapper: `items` is [(PrunableWeight, wrap)],
    `wrap(graph, weight node, sole)` making the node that stands for the weight.

    Right after each `get_attr` read, and as the weights of each module call made functional (one
    functional call per module call, whatever number of its weights are wrapped). `sole` is true
    where the wrapped weight feeds exactly one matmul-like op, whose weight gradient is then a
    fresh tensor that nothing else holds.
    """
    g = gm.graph
    calls: dict[fx.Node, list[tuple[str, str, Callable]]] = {}
    for pw, wrap in items:
        # only where the op's weight gradient is a fresh tensor may it be masked in place
        weight_reads = {u.node for u in pw.uses if u.row.fresh_grad}
        for getter in pw.getattrs:
            sole = getter in weight_reads and len(getter.users) == 1
            with g.inserting_before(getter.next):
                new = wrap(g, getter, sole)
            getter.replace_all_uses_with(new, delete_user_cb=lambda user, n=new: user is not n)
        for use in pw.uses:
            if use.node.op == "call_module":
                calls.setdefault(use.node, []).append((use.param, f"{use.node.target}.{use.param}", wrap))
    for call, wrapped in calls.items():
        row = module_row(gm.get_submodule(call.target))
        fresh = row is not None and row.fresh_grad

        def weights(g: fx.Graph, wrapped=wrapped, fresh=fresh) -> dict[str, fx.Node]:
            # a Linear/Conv weight gradient is fresh; an LSTM's may be a view of a flat buffer
            return {name: wrap(g, tag(get_attr(g, target), pass_name, Role.WEIGHT), fresh) for name, target, wrap in wrapped}

        functionalize(gm, call, weights, pass_name)
