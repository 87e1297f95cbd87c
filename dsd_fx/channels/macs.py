"""Parameters and multiply-accumulates of a model, counted from its graph and propagated shapes."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from dsd_fx.infra.graph_capture import capture
from dsd_fx.channels.groups import as_args, propagate_shapes
from dsd_fx.channels.rules import shape

_MATMULS = {F.linear, torch.matmul, torch.mm, torch.bmm, "matmul", "mm", "bmm"}


@dataclass(frozen=True)
class Cost:
    """params: distinct parameter elements; macs: multiply-accumulates of one forward of the
    example (Linear, Conv*, ConvTranspose*, matmul-like functions); per_node: MACs by node."""

    params: int
    macs: int
    per_node: dict[str, int] = field(default_factory=dict)


def _module_macs(module: nn.Module, node: fx.Node) -> int:
    out, x = shape(node), shape(node.args[0]) if node.args else None
    if out is None or x is None:
        return 0
    if isinstance(module, nn.Linear):
        return math.prod(out) * module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        k = math.prod(module.kernel_size)
        if module.transposed:
            return math.prod(x) * module.out_channels // module.groups * k
        return math.prod(out) * module.in_channels // module.groups * k
    if isinstance(module, nn.MultiheadAttention):
        e, t = module.embed_dim, math.prod(out[:-1])
        return 4 * t * e * e + 2 * t * (x[-2] if module.batch_first else x[0]) * e
    return 0


def graph_cost(gm: fx.GraphModule) -> Cost:
    """The Cost of a shape-propagated GraphModule."""
    per_node = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            per_node[node.name] = _module_macs(gm.get_submodule(node.target), node)
        elif node.op in ("call_function", "call_method") and node.target in _MATMULS:
            out, x = shape(node), shape(node.args[0])
            per_node[node.name] = math.prod(out) * x[-1] if out is not None and x is not None else 0
    params = sum(p.numel() for p in {id(p): p for p in gm.parameters()}.values())
    return Cost(params, sum(per_node.values()), {k: v for k, v in per_node.items() if v})


def cost(model: nn.Module, example_args: Any) -> Cost:
    """Params and MACs of `model` on `example_args` (model unchanged: shapes found in eval mode)."""
    gm = capture(model)
    propagate_shapes(gm, as_args(example_args))
    return graph_cost(gm)
