"""Channel layouts through an fx graph: which producer's channels sit where in every tensor."""
from __future__ import annotations


import torch.nn as nn
from torch import fx
from torch.utils._pytree import tree_flatten

from dsd_fx.channels import rules
from dsd_fx.channels import weights as channel_weights
from dsd_fx.channels.layout import FlowState
from dsd_fx.op_table import ChannelRule, Flow, channel_rule, function_row, module_row

_HANDLERS = {Flow.ELEMENTWISE: rules.elementwise, Flow.PASS: rules.passthrough, Flow.NORM: rules.norm,
             Flow.RESHAPE: rules.reshape, Flow.MOVE: rules.move, Flow.CAT: rules.cat, Flow.SPLIT: rules.split,
             Flow.REDUCE: rules.reduce, Flow.QUERY: rules.query, Flow.INDEX: rules.index}


class Propagation:
    """One forward walk over a shape-propagated graph, assigning each tensor its Layout."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm, self.state = gm, FlowState()
        self.layouts: dict[fx.Node, object] = {}

    def run(self) -> FlowState:
        for node in self.gm.graph.nodes:
            try:
                self.layouts[node] = self._visit(node)
            except Exception as err:  # noqa: BLE001 - an op the rules cannot follow keeps its channels
                self.block_inputs(node, f"dsd_fx could not follow channels through it ({type(err).__name__}: {err})")
                self.layouts[node] = None
        return self.state

    def _ins(self, node: fx.Node) -> list:
        flat, _ = tree_flatten((node.args, node.kwargs))
        return [self.layouts.get(a) for a in flat if isinstance(a, fx.Node)]

    def block_inputs(self, node: fx.Node, reason: str) -> None:
        """Every channel that reaches `node` stays: `reason` names the node and says why."""
        self.state.block(self._ins(node), f"node '{node.name}': {reason}")

    def _visit(self, node: fx.Node):
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            self.block_inputs(node, "reaches the model's output (its channels are the model's)")
            return None
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            row = module_row(module)
            if row is None:
                self.block_inputs(node, f"{type(module).__name__} has no row in dsd_fx.op_table")
                return None
            rule = channel_rule(row)
            if rule is None:
                return channel_weights.weight_op(self, node, module, row)
            return self._rule(node, rule, module)
        row = function_row(node)
        rule = channel_rule(row)
        if rule is None and row is not None and any(s.out_dim is not None for s in row.slots_of()):
            return channel_weights.function_weight_op(self, node, row)
        if rule is None:
            self.block_inputs(node, f"{node.op} {getattr(node.target, '__name__', node.target)}: no row in dsd_fx.op_table")
            return None
        return self._rule(node, rule, None)

    def _rule(self, node: fx.Node, rule: ChannelRule, module: nn.Module | None):
        handler = _HANDLERS.get(rule.flow)
        if handler is None:
            self.block_inputs(node, rule.reason or f"{rule.flow.value} op")
            return None
        return handler(self, node, rule, module)

