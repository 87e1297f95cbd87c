"""Channel analysis for structural pruning and growth: which channels of which layers go together.

groups (ChannelGroup, channel_groups), layout (members, segments, layouts), flow (propagation of
layouts through a graph by the op table's channel rules), rules (one handler per op_table.Flow),
weights (where weight ops make and consume channels), macs (parameters and MACs: `cost`).
"""
from __future__ import annotations

from dsd_fx.infra.lazy import reexport

__all__, __getattr__ = reexport(__name__, {
    "groups": ("ChannelGroup", "channel_groups", "groups_of", "propagate_shapes"),
    "layout": ("Member", "Segment", "Layout", "FlowState"),
    "flow": ("Propagation",),
    "macs": ("Cost", "cost", "graph_cost"),
})
