"""Parameters and multiply-accumulates of a model, counted from its graph and propagated shapes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn
from torch import fx

from dsd_fx.infra.graph_capture import capture
from dsd_fx.channels.groups import propagate_shapes
from dsd_fx.infra.calls import as_args
from dsd_fx.channels.rules import shape
from dsd_fx.op_table import function_row, module_row

@dataclass(frozen=True)
class Cost:
    """params: distinct parameter elements; macs: multiply-accumulates of one forward of the
    example (Linear, Conv*, ConvTranspose*, matmul-like functions); per_node: MACs by node."""

    params: int
    macs: int
    per_node: dict[str, int] = field(default_factory=dict)


def graph_cost(gm: fx.GraphModule) -> Cost:
    """The Cost of a shape-propagated GraphModule."""
    per_node = {}
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        row = module_row(module) if module is not None else function_row(node)
        if row is None or row.macs is None:
            continue
        out, x = shape(node), shape(node.args[0]) if node.args else None
        per_node[node.name] = row.macs(module, out, x) if out is not None and x is not None else 0
    params = sum(p.numel() for p in {id(p): p for p in gm.parameters()}.values())
    return Cost(params, sum(per_node.values()), {k: v for k, v in per_node.items() if v})


def cost(model: nn.Module, example_args: Any) -> Cost:
    """Params and MACs of `model` on `example_args` (model unchanged: shapes found in eval mode)."""
    gm = capture(model)
    propagate_shapes(gm, as_args(example_args, "channel analysis"))
    return graph_cost(gm)
