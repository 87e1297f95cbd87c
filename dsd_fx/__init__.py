"""dsd_fx: Dense-Sparse-Dense and N:M sparse training as torch.fx graph rewrites."""
from __future__ import annotations

from dsd_fx import aten_rows as _aten_rows  # noqa: F401  (adds the aten rows to the op table, before any use)
from dsd_fx import aten_channels as _aten_channels  # noqa: F401  (and the aten ops' channel rows)
from dsd_fx.channels import ChannelGroup, channel_groups
from dsd_fx.config import SparseConfig
from dsd_fx.graph_diff import GraphDiff, diff, diff_onnx
from dsd_fx.importance import importance
from dsd_fx.divergence import SAD, SADTracker, sad
from dsd_fx.export import export_onnx
from dsd_fx.flow import DSD, PhaseRecord
from dsd_fx.gpp import GPP, GPPRecord, PruneStep
from dsd_fx.macs import Cost, cost
from dsd_fx.phases import changes, transform
from dsd_fx.prunable import PrunableWeight
from dsd_fx.grow_config import GrowConfig
from dsd_fx.prune_config import PruneConfig
from dsd_fx.prune_proof import PrunedReport, verify_pruned
from dsd_fx.push import PushConfig, push_loss, tap_utility
from dsd_fx.state import MaskRecord, current_masks, masks_of
from dsd_fx.verify import ZeroOverheadReport, compare_onnx, verify_zero_overhead

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
    "masks_of",
    "MaskRecord",
    "diff",
    "GraphDiff",
    "diff_onnx",
    "DSD",
    "PhaseRecord",
    "GPP",
    "GPPRecord",
    "PruneStep",
    "PruneConfig",
    "GrowConfig",
    "channel_groups",
    "ChannelGroup",
    "cost",
    "Cost",
    "verify_pruned",
    "PrunedReport",
    "push_loss",
    "tap_utility",
    "importance",
    "PushConfig",
]
__version__ = "0.1.0"
