"""Sparse training: which weights, which masks, how they are stored, and the sparse and dense phases' plans.

config (SparseConfig), prunable (the weight uses the op table finds), selection (what a config
selects, checked before any change), masks (pure mask math: magnitude, N:M), wanda (activation-aware
scores from calibration batches recorded by taps), packing (N:M storage and
torch's 2:4 forms), divergence (SAD), plans (the sparse and re-dense phases as recipes of passes).
"""
from __future__ import annotations

from dsd_fx.infra.lazy import reexport

__all__, __getattr__ = reexport(__name__, {
    "config": ("SparseConfig",),
    "prunable": ("WeightUse", "PrunableWeight", "find_prunable", "module_weights", "resolve"),
    "selection": ("select_weights", "select_nm", "reduction_dim"),
    "masks": ("magnitude_mask", "global_magnitude_masks", "nm_mask", "nm_keep", "nm_view", "nm_sparsify", "n_pruned", "parse_pattern"),
    "packing": ("pack_tensor", "unpack_tensor", "gather_nm", "CompressedWeights", "compress_semi_structured"),
    "divergence": ("SAD", "SADTracker", "sad"),
    "wanda": ("input_norms", "wanda_scores", "row_mask"),
})
