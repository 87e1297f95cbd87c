"""Export and proofs: ONNX export (a translation), onnxruntime, the zero-overhead and the pruned-model proofs.

export (export_onnx), runtime (onnxruntime sessions, feeds, latency), zero_overhead
(verify_zero_overhead, compare_onnx), pruned (verify_pruned).
"""
from __future__ import annotations

from dsd_fx.infra.lazy import reexport

__all__, __getattr__ = reexport(__name__, {
    "export": ("export_onnx",),
    "runtime": ("Runtime", "max_abs_diff", "latency_ms"),
    "zero_overhead": ("ZeroOverheadReport", "OnnxComparison", "compare_onnx", "verify_zero_overhead"),
    "pruned": ("PrunedReport", "verify_pruned"),
})
