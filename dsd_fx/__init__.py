"""dsd_fx: Dense-Sparse-Dense and N:M sparse training as torch.fx graph rewrites."""
from __future__ import annotations

from dsd_fx.config import SparseConfig
from dsd_fx.diff import GraphDiff, diff, diff_onnx
from dsd_fx.flow import DSD, PhaseRecord
from dsd_fx.export import ZeroOverheadReport, compare_onnx, export_onnx, verify_zero_overhead
from dsd_fx.sad import SAD, SADTracker, current_masks, sad
from dsd_fx.select import PrunableWeight
from dsd_fx.transform import changes, transform

__all__ = [
    "SparseConfig",
    "PrunableWeight",
    "transform",
    "changes",
    "export_onnx",
    "verify_zero_overhead",
    "compare_onnx",
    "ZeroOverheadReport",
    "sad",
    "SAD",
    "SADTracker",
    "current_masks",
    "diff",
    "GraphDiff",
    "diff_onnx",
    "DSD",
    "PhaseRecord",
]
__version__ = "0.1.0"
