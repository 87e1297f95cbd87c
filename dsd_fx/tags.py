"""The one helper that marks the nodes dsd_fx makes, and finds them again."""
from __future__ import annotations

from typing import Any, Iterator

import torch.fx as fx

META_KEY = "dsd_fx"


def tag(node: fx.Node, pass_name: str, role: str, **info: Any) -> fx.Node:
    """Mark `node` as made by `pass_name` in `role`; inverse passes find it with `tagged`."""
    node.meta[META_KEY] = {"pass": pass_name, "role": role, **info}
    return node


def tag_of(node: fx.Node) -> dict[str, Any] | None:
    return node.meta.get(META_KEY)


def tagged(graph: fx.Graph, pass_name: str | None = None, role: str | None = None) -> Iterator[fx.Node]:
    """The nodes of `graph` tagged by `pass_name` (any pass if None) in `role` (any if None)."""
    for node in list(graph.nodes):
        t = node.meta.get(META_KEY)
        if t is None:
            continue
        if pass_name is not None and t["pass"] != pass_name:
            continue
        if role is not None and t["role"] != role:
            continue
        yield node


def has_dsd_nodes(graph: fx.Graph) -> bool:
    return next(tagged(graph), None) is not None
