"""Seeing what changed: fx and ONNX graphs as networkx graphs, diffs, pictures, LLVM-style -print-changed.

graphs (a leaf: fx_to_nx, onnx_to_nx, match_graphs), graph_diff (diff, diff_onnx), draw (DOT, SVG,
PNG), print_changed (PrintChanged).
"""
from __future__ import annotations

from dsd_fx.infra.lazy import reexport

__all__, __getattr__ = reexport(__name__, {
    "graphs": ("fx_to_nx", "onnx_to_nx", "match_graphs"),
    "graph_diff": ("GraphDiff", "diff", "diff_graphs", "diff_onnx"),
    "draw": ("to_dot", "draw_png", "write_pictures"),
    "print_changed": ("PrintChanged",),
})
