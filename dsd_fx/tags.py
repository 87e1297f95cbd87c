"""The one helper that marks the nodes dsd_fx makes, and finds them again."""
from __future__ import annotations

from enum import Enum, unique
from typing import Any, Iterator

import torch.fx as fx

META_KEY = "dsd_fx"
# the submodules that record a transform on a GraphModule (state.TransformState, taps.TapRecorder);
# each keeps the tags of the whole graph, so that they survive torch.load
RECORDS = ("_dsd_fx", "_dsd_fx_taps")


@unique
class Role(str, Enum):
    """What a node that dsd_fx made stands for; inverse passes find nodes by role."""

    MASK_BUFFER = "mask_buffer"  # get_attr of a `<weight>_mask` buffer
    MASKED_WEIGHT = "masked_weight"  # the weight as the op sees it: mask_mul(W, M), sparsify_nm(W, ...)
    WEIGHT = "weight"  # get_attr of a weight, made to feed a functional call
    BIAS = "bias"  # get_attr of a bias, made to feed a functional call
    LAYER = "layer"  # get_attr of the layer a module_call runs
    OP = "op"  # the functional call standing for a module call
    HELPER = "helper"  # a node a functional form needs beside its op (an explicit pad)
    PACKED_VALUES = "packed_values"  # get_attr of `<weight>_values`
    PACKED_META = "packed_meta"  # get_attr of `<weight>_meta`
    PACKED_OP = "packed_op"  # dsd_fx::nm_linear standing for a linear-like op
    UNPACKED = "unpacked"  # dsd_fx::nm_unpack: the dense weight from packed storage
    RESTORED = "restored"  # a node unpack_nm gave back, under its original name
    TAP = "tap"  # a push tap recording activations
    TAP_RECORDER = "tap_recorder"  # get_attr of the recorder the taps write to
    GROWN = "grown"  # a node the grow phase added (an Inception branch): part of the model from then on


# roles of nodes that stay in the model: no inverse pass removes them, and they do not make a
# graph sparse-phase (has_dsd_nodes) or count as dsd_fx left over after re-dense
PERMANENT = frozenset({Role.GROWN})


def tag(node: fx.Node, pass_name: str, role: Role, **info: Any) -> fx.Node:
    """Mark `node` as made by `pass_name` in `role`; inverse passes find it with `tagged`."""
    if not isinstance(role, Role):
        raise TypeError(f"tag: role must be a dsd_fx.tags.Role, got {role!r}")
    node.meta[META_KEY] = {"pass": pass_name, "role": role, **info}
    return node


def untagged_meta(node: fx.Node) -> dict[str, Any]:
    """`node.meta` without a dsd_fx tag that an inverse pass removes: what a restored node gets
    back (a permanent tag, as on a grown layer that DSD masks, stays). Shape propagation's
    `tensor_meta` (left by the prune and grow phases) is dropped too: it goes stale as shapes change,
    and the tags that keep this meta for torch.load cannot pickle it."""
    return {k: v for k, v in node.meta.items() if k != "tensor_meta" and (k != META_KEY or is_permanent(node))}


def tag_of(node: fx.Node) -> dict[str, Any] | None:
    return node.meta.get(META_KEY)


def tagged(graph: fx.Graph, pass_name: str | None = None, role: Role | None = None) -> Iterator[fx.Node]:
    """The nodes of `graph` tagged by `pass_name` (any pass if None) in `role` (any if None).

    Tags that a torch.load dropped are put back first (see `persist`)."""
    _restore(graph)
    for node in list(graph.nodes):
        t = node.meta.get(META_KEY)
        if t is None:
            continue
        if pass_name is not None and t["pass"] != pass_name:
            continue
        if role is not None and t["role"] != role:
            continue
        yield node


def is_permanent(node: fx.Node) -> bool:
    t = node.meta.get(META_KEY)
    return t is not None and t["role"] in PERMANENT


def has_dsd_nodes(graph: fx.Graph) -> bool:
    """Whether `graph` has nodes of a phase that an inverse pass removes (masks, packing, taps);
    grown nodes (PERMANENT roles) are part of the model and do not count."""
    return any(not is_permanent(n) for n in tagged(graph))


def _target_key(target: Any) -> str:
    return target if isinstance(target, str) else f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', target)}"


def persist(gm: fx.GraphModule) -> None:
    """Keep the graph's tags, by node name, op and target, on its records (RECORDS):
    torch.save/torch.load of a GraphModule re-traces its code and drops node.meta; `tagged` puts
    them back. Call it after every rewrite of a graph that has a record."""
    saved = {n.name: (n.op, _target_key(n.target), n.meta[META_KEY]) for n in gm.graph.nodes if META_KEY in n.meta}
    for name in RECORDS:
        if name in gm._modules:
            gm._modules[name].tags = saved


def _read(model: object, target: str) -> object:
    """What a get_attr of `target` reads (by identity), or the target itself where it reads nothing."""
    obj = model
    for atom in target.split("."):
        obj = getattr(obj, atom, None)
        if obj is None:
            return target
    return id(obj)


def _restore(graph: fx.Graph) -> None:
    """Put back the tags the graph's records kept (see `persist`) if the graph lost them."""
    modules = getattr(graph.owning_module, "_modules", {})
    saved = next((getattr(modules[n], "tags", None) for n in RECORDS if n in modules), None)
    if not saved or any(META_KEY in n.meta for n in graph.nodes):
        return
    nodes = {n.name: n for n in graph.nodes}
    # re-tracing names get_attr nodes after their target and in order of first use, and reads a tied
    # weight under one of its names: match those by the object they read (the same name first),
    # every other node by name, op and target
    free: dict[object, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "get_attr":
            free.setdefault(_read(graph.owning_module, n.target), []).append(n)
    found, mismatched, taken = {}, [], {}
    for name, (op, target, t) in saved.items():
        if op == "get_attr":
            key = _read(graph.owning_module, target)
            pool = free.get(key, [])
            node = next((n for n in pool if n.name == name), pool[0] if pool else None)
            if node is not None:
                pool.remove(node)
                taken.setdefault(key, node)
            elif key in taken and found[taken[key]]["role"] == t["role"]:
                node = taken[key]  # two reads of one tied weight that the re-trace merged into one node
        else:
            node = nodes.get(name)
            node = node if node is not None and node.op == op and _target_key(node.target) == target else None
        if node is None:
            mismatched.append(name)
        else:
            found[node] = t
    if mismatched:
        raise ValueError(
            f"this GraphModule was made by dsd_fx but its graph no longer matches what dsd_fx made (nodes "
            f"{', '.join(mismatched[:5])}); was it edited after loading? Save and load state_dicts instead "
            "(dsd_fx.transform the model with the same options, then load_state_dict)"
        )
    for node, t in found.items():
        node.meta[META_KEY] = t
