"""The proof of structural pruning: the same ONNX graph with smaller shapes, and what it saves."""
from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch.utils._pytree import tree_flatten

from dsd_fx.infra.calls import as_args, eval_mode
from dsd_fx.channels.macs import cost
from dsd_fx.proof.export import export_onnx
from dsd_fx.proof.runtime import feeds as ort_inputs, sessions_for, tolerance

INDEXING = ("Gather", "GatherElements", "GatherND", "Slice", "Pad", "ScatterND", "ScatterElements", "Compress", "Where")


@dataclass(frozen=True)
class Row:
    name: str
    original: str
    pruned: str
    ok: bool | None  # None: reported, not checked


@dataclass(frozen=True)
class PrunedReport:
    """verify_pruned's result: `.ok` (every checked row holds) and a readable `.table`."""

    rows: tuple[Row, ...]
    ratios: dict[str, float]

    @property
    def ok(self) -> bool:
        return all(r.ok is not False for r in self.rows)

    @property
    def table(self) -> str:
        rows = [("", "original", "pruned", "ok")] + [(r.name, r.original, r.pruned, {True: "yes", False: "NO", None: "-"}[r.ok]) for r in self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [" | ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        lines.append(f"pruned: same graph, smaller shapes: {'PROVEN' if self.ok else 'NOT PROVEN'}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table


def _ops(proto: onnx.ModelProto) -> Counter:
    return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in proto.graph.node)


def _bytes(proto: onnx.ModelProto) -> int:
    return sum(int(numpy_helper.to_array(i).nbytes) for i in proto.graph.initializer)


def _torch_out(model, args) -> list[np.ndarray]:
    with eval_mode(model, no_grad=True):
        return [t.detach().float().numpy() for t in tree_flatten(model(*args))[0] if isinstance(t, torch.Tensor)]


def _latency(original, pruned, sessions, feeds, args, runs: int) -> dict[str, float]:
    """Median seconds of each, runs interleaved so that drift on a shared machine hits both."""
    times = {k: [] for k in ("ort_original", "ort_pruned", "torch_original", "torch_pruned")}
    calls = {"ort_original": lambda: sessions[0].run(None, feeds[0]), "ort_pruned": lambda: sessions[1].run(None, feeds[1])}
    with eval_mode(original, no_grad=True), eval_mode(pruned, no_grad=True):
        calls["torch_original"], calls["torch_pruned"] = (lambda: original(*args)), (lambda: pruned(*args))
        for f in calls.values():
            f()
        for _ in range(runs):
            for k, f in calls.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def verify_pruned(original: torch.nn.Module, pruned: torch.nn.Module, example_args: Any, *, rtol: float | None = None,
                  atol: float | None = None, latency_runs: int = 20) -> PrunedReport:
    """Export both (fold=False) and check that pruning changed shapes only: the same node count and
    op types (no Gather, Slice, Pad or other indexing op added), onnxruntime on the pruned file
    matches torch (within atol + rtol * largest |output|; by default by dtype, as
    verify_zero_overhead: dsd_fx.proof.runtime.TOLERANCES); report params, initializer bytes, MACs and
    latency (onnxruntime and torch, interleaved medians) of each and their ratios."""
    args = as_args(example_args, "channel analysis")
    ref, fin = export_onnx(original, args, fold=False), export_onnx(pruned, args, fold=False)
    ops_ref, ops_fin = _ops(ref), _ops(fin)
    added = {op: ops_fin[op] - ops_ref[op] for op in INDEXING if ops_fin[op] > ops_ref[op]}
    # where onnxruntime's CPU provider cannot run the dtype (bf16 Gemm or Conv): float32 copies of both
    rt = sessions_for(original, pruned, args, ref, fin, optimize=True)
    sessions = (rt.reference, rt.final)
    feeds = (ort_inputs(sessions[0], rt.args), ort_inputs(sessions[1], rt.args))
    got, want = sessions[1].run(None, feeds[1]), _torch_out(rt.model, rt.args)
    diff = max((float(np.max(np.abs(g.astype(np.float32) - w))) for g, w in zip(got, want) if w.size), default=0.0)
    rtol, atol = tolerance(rt.model, rt.args, rtol, atol)
    tol = atol + rtol * max((float(np.max(np.abs(w))) for w in want if w.size), default=0.0)
    c_ref, c_fin = cost(original, args), cost(pruned, args)
    lat = _latency(original, pruned, sessions, feeds, args, latency_runs)  # torch in the models' own dtype
    ratio = lambda a, b: b / a if a else float("nan")  # noqa: E731
    ratios = {"params": ratio(c_ref.params, c_fin.params), "bytes": ratio(_bytes(ref), _bytes(fin)),
              "macs": ratio(c_ref.macs, c_fin.macs), "ort_latency": ratio(lat["ort_original"], lat["ort_pruned"]),
              "torch_latency": ratio(lat["torch_original"], lat["torch_pruned"])}
    rows = (
        Row("ONNX nodes", str(len(ref.graph.node)), str(len(fin.graph.node)), len(ref.graph.node) == len(fin.graph.node)),
        Row("op types", "", "same" if ops_ref == ops_fin else f"differ: {dict(ops_fin - ops_ref)} vs {dict(ops_ref - ops_fin)}", ops_ref == ops_fin),
        Row("indexing ops added", "", ", ".join(f"{k} +{v}" for k, v in added.items()) or "none", not added),
        Row("onnxruntime vs torch max |diff|" + (" (float32 copy)" if rt.float32_copy else ""), f"tol {tol:.1e}",
            f"{diff:.1e}", len(got) == len(want) and diff <= tol),
        Row("params", f"{c_ref.params:,}", f"{c_fin.params:,} ({ratios['params']:.3f}x)", c_fin.params <= c_ref.params),
        Row("initializer bytes", f"{_bytes(ref):,}", f"{_bytes(fin):,} ({ratios['bytes']:.3f}x)", None),
        Row("MACs", f"{c_ref.macs:,}", f"{c_fin.macs:,} ({ratios['macs']:.3f}x)", c_fin.macs <= c_ref.macs),
        Row("onnxruntime latency (median)", f"{lat['ort_original'] * 1e3:.3f} ms", f"{lat['ort_pruned'] * 1e3:.3f} ms ({ratios['ort_latency']:.2f}x)", None),
        Row("torch latency (median)", f"{lat['torch_original'] * 1e3:.3f} ms", f"{lat['torch_pruned'] * 1e3:.3f} ms ({ratios['torch_latency']:.2f}x)", None),
    )
    return PrunedReport(rows, ratios)
