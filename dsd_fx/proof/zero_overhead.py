"""Proofs on exported graphs: the ONNX comparison and the zero-overhead report (state_dict, onnxruntime parity, latency)."""
from __future__ import annotations

import copy
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import networkx as nx
import onnx
import torch

from dsd_fx.proof import runtime
from dsd_fx.infra.calls import as_args
from dsd_fx.proof.export import export_onnx
from dsd_fx.diagnostics.graphs import load_onnx, onnx_initializers, onnx_op, onnx_to_nx

__all__ = ["Check", "OnnxComparison", "ZeroOverheadReport", "compare_onnx", "verify_zero_overhead"]


@dataclass
class Check:
    """One row of a proof: what the reference and the final model show, and whether they agree."""

    name: str
    reference: str
    final: str
    ok: bool


def format_table(rows: Sequence[tuple[str, str, str, str]], ok: bool, differences: Sequence[str] = (),
                 notes: Sequence[str] = ()) -> str:
    """Rows (check, reference, final, ok) as aligned columns, the verdict, then each difference and note."""
    rows = [("check", "reference", "final", "ok"), *rows]
    widths = [min(60, max(len(r[i]) for r in rows)) for i in range(4)]
    lines = []
    for k, r in enumerate(rows):
        lines.append(" | ".join(str(x)[:60].ljust(w) for x, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append("-+-".join("-" * w for w in widths))
    lines.append(f"zero overhead: {'PROVEN' if ok else 'NOT PROVEN'}")
    lines += [f"  - {d}" for d in differences]
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def _rows(checks: Sequence[Check]) -> list[tuple[str, str, str, str]]:
    return [(c.name, c.reference, c.final, "yes" if c.ok else "NO") for c in checks]


@dataclass
class OnnxComparison:
    """The checks of `compare_onnx` and every difference found, by name."""

    checks: list[Check]
    differences: list[str]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def table(self) -> str:
        return format_table(_rows(self.checks), self.ok, self.differences)


# ---------------------------------------------------------------- ONNX comparison


def _fmt_counter(c: Counter) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(c.items()))


def _describe(node: onnx.NodeProto) -> str:
    return f"node '{node.name}' ({onnx_op(node)}) reading {', '.join(i for i in node.input if i) or 'nothing'}"


def _node_checks(rn: list, fn: list, diffs: list[str]) -> list[Check]:
    rc, fc = Counter(map(onnx_op, rn)), Counter(map(onnx_op, fn))
    for op, extra in (fc - rc).items():
        nodes = [n for n in fn if onnx_op(n) == op]
        # name the extra nodes: those whose inputs differ from every reference node of the op
        ref_inputs = Counter(tuple(n.input) for n in rn if onnx_op(n) == op)
        suspects = [n for n in nodes if not ref_inputs.get(tuple(n.input))] or nodes
        diffs += [f"extra {_describe(n)}" for n in suspects[:extra]]
    diffs += [f"missing {missing} x {op}" for op, missing in (rc - fc).items()]
    return [Check("node count", str(len(rn)), str(len(fn)), len(rn) == len(fn)),
            Check("op types", _fmt_counter(rc), _fmt_counter(fc), rc == fc)]


def _initializer_checks(ri: dict, fi: dict, diffs: list[str]) -> list[Check]:
    diffs += [f"extra initializer '{n}' {fi[n][0]} {fi[n][1]}" for n in sorted(set(fi) - set(ri))]
    diffs += [f"missing initializer '{n}' {ri[n][0]} {ri[n][1]}" for n in sorted(set(ri) - set(fi))]
    both = sorted(set(ri) & set(fi))
    differ = [n for n in both if ri[n][:2] != fi[n][:2]]
    diffs += [f"initializer '{n}': {ri[n][0]} {ri[n][1]} in reference, {fi[n][0]} {fi[n][1]} in final" for n in differ]
    rb, fb = sum(v[2] for v in ri.values()), sum(v[2] for v in fi.values())
    return [Check("initializer names", f"{len(ri)} names", f"{len(fi)} names", set(ri) == set(fi)),
            Check("initializer shapes and dtypes", "", "", not differ),
            Check("initializer bytes", f"{rb:,}", f"{fb:,}", rb == fb)]


def _value_infos(values) -> list[tuple[tuple, str]]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
        out.append((dims, onnx.TensorProto.DataType.Name(t.elem_type)))
    return out


def _io_check(reference: onnx.ModelProto, final: onnx.ModelProto, diffs: list[str]) -> Check:
    rio = (_value_infos(reference.graph.input), _value_infos(reference.graph.output))
    fio = (_value_infos(final.graph.input), _value_infos(final.graph.output))
    if rio != fio:
        diffs.append(f"inputs/outputs differ: {rio} vs {fio}")
    return Check("inputs and outputs", f"{len(rio[0])} in, {len(rio[1])} out", f"{len(fio[0])} in, {len(fio[1])} out", rio == fio)


# names the exporter invents for the constants it folds (a transposed weight, a shape): a counter,
# which a graph re-exported from torch.export's aten graph advances differently from the model's
# own export; the weights keep the model's names
_ANONYMOUS = re.compile(r"^val_\d+(/.*)?$")


def canonical_names(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `proto` whose anonymous initializers (`val_<n>`) are renamed `const_<k>` in the order
    the graph's nodes first read them: two exports that differ only in the exporter's counter
    then read the same names. Every other name (the model's weights) is left as it is."""
    rename: dict[str, str] = {}
    inits = {i.name for i in proto.graph.initializer}
    for node in proto.graph.node:
        for name in node.input:
            if name in inits and name not in rename and _ANONYMOUS.match(name):
                rename[name] = f"const_{len(rename)}"
    if not rename:
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for init in out.graph.initializer:
        init.name = rename.get(init.name, init.name)
    for node in out.graph.node:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
    for v in (*out.graph.input, *out.graph.output, *out.graph.value_info):
        v.name = rename.get(v.name, v.name)
    return out


def compare_onnx(reference: onnx.ModelProto | str | os.PathLike, final: onnx.ModelProto | str | os.PathLike) -> OnnxComparison:
    """Compare two ONNX graphs (ModelProtos or file paths, as diff_onnx takes) node by node: count,
    op types, isomorphism, initializers, I/O.

    Initializers the exporter names by its own counter (`val_<n>`: folded transposes and shapes)
    are compared by where the graph reads them (`canonical_names`); the model's weights by name."""
    reference, final = canonical_names(load_onnx(reference)), canonical_names(load_onnx(final))
    diffs: list[str] = []
    checks = _node_checks(list(reference.graph.node), list(final.graph.node), diffs)
    checks += _initializer_checks(onnx_initializers(reference), onnx_initializers(final), diffs)
    checks.append(_io_check(reference, final, diffs))
    iso = nx.is_isomorphic(
        onnx_to_nx(reference),
        onnx_to_nx(final),
        node_match=lambda a, b: a["label"] == b["label"],
        edge_match=lambda a, b: a["slots"] == b["slots"],
    )
    checks.append(Check("graph isomorphism", "", "", iso))
    if not iso and not diffs:
        diffs.append("the graphs have the same nodes but are wired differently")
    return OnnxComparison(checks, diffs)


# ---------------------------------------------------------------- state_dict


def _spec(value: Any) -> tuple[tuple[int, ...], str] | None:
    if not isinstance(value, torch.Tensor):
        return None  # e.g. a module's extra state: compared by key only
    return tuple(value.shape), str(value.dtype).removeprefix("torch.")


def state_dict_checks(reference: Mapping[str, Any], final: Mapping[str, Any]) -> tuple[list[Check], list[str]]:
    """Same keys, and every tensor the same shape and dtype: what `load_state_dict` back into the
    user's own class needs, and what an ONNX file never shows for a buffer the graph does not read."""
    diffs = [f"state_dict key '{k}' only in final" for k in final if k not in reference]
    diffs += [f"state_dict key '{k}' only in reference" for k in reference if k not in final]
    keys_ok = not diffs
    differ = [k for k in reference if k in final and _spec(reference[k]) != _spec(final[k])]
    for k in differ:
        (rs, rd), (fs, fd) = _spec(reference[k]) or ((), "object"), _spec(final[k]) or ((), "object")
        diffs.append(f"state_dict '{k}': {rs} {rd} in reference, {fs} {fd} in final")
    checks = [Check("state_dict keys", f"{len(reference)} keys", f"{len(final)} keys", keys_ok),
              Check("state_dict shapes and dtypes", "", "", not differ)]
    return checks, diffs


def _parity(rt: runtime.Runtime, rtol: float | None, atol: float | None, diffs: list[str]) -> tuple[Check, float, float]:
    rtol, atol = runtime.tolerance(rt.model, rt.args, rtol, atol)
    max_diff, scale, mismatch = runtime.max_abs_diff(rt)
    if mismatch:
        diffs.append(mismatch)
    tolerance = atol + rtol * scale
    name = "onnxruntime vs torch max |diff|" + (" (float32 copy)" if rt.float32_copy else "")
    reference = f"tol {tolerance:.2e}" + (f" ({rt.float32_copy.split(':')[0]} not runnable)" if rt.float32_copy else "")
    return Check(name, reference, f"{max_diff:.2e}", max_diff <= tolerance), max_diff, tolerance


# ---------------------------------------------------------------- the proof


@dataclass
class ZeroOverheadReport:
    """The result of verify_zero_overhead: `.ok`, the checks, and a readable `.table`.

    `onnxruntime_float32_copy`: onnxruntime could not run the exported graphs' dtype, so parity
    and latency were measured on float32 copies of both models (said in `notes` and the table).
    """

    checks: list[Check]
    differences: list[str]
    max_abs_diff: float
    tolerance: float
    latency_ratio: float
    latency_ms: tuple[float, float]
    notes: list[str] = field(default_factory=list)
    onnxruntime_float32_copy: bool = False

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def table(self) -> str:
        latency = ("onnxruntime latency (median)" + (" (float32 copy)" if self.onnxruntime_float32_copy else ""),
                   f"{self.latency_ms[0]:.3f} ms", f"{self.latency_ms[1]:.3f} ms",
                   f"ratio {self.latency_ratio:.3f} (not checked)")
        return format_table([*_rows(self.checks), latency], self.ok, self.differences, self.notes)

    def __str__(self) -> str:
        return self.table


def _same_weights(reference_model: torch.nn.Module, final_state: Mapping[str, Any]) -> torch.nn.Module:
    """A copy of the reference holding the final model's values wherever key, shape and dtype agree."""
    reference_model = copy.deepcopy(reference_model)
    ref_state = reference_model.state_dict()
    loadable = {k: v for k, v in final_state.items() if k in ref_state and _spec(ref_state[k]) == _spec(v)}
    reference_model.load_state_dict(loadable, strict=False)
    return reference_model


def verify_zero_overhead(
    reference_model: torch.nn.Module,
    final_model: torch.nn.Module,
    example_args: Any,
    *,
    optimize: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    latency_runs: int = 30,
    same_weights: bool = True,
) -> ZeroOverheadReport:
    """Prove that `final_model` costs nothing more at inference than `reference_model`.

    The two state_dicts must hold the same keys, each tensor the same shape and dtype (a buffer
    the graph never reads is in no ONNX file, yet the model carries it). Both models are exported
    the same way (`fold=False`: a mask left in `final_model` stays visible); the ONNX graphs must
    match node by node (count, op types, isomorphism), in initializer names, shapes, dtypes and
    bytes, and in inputs and outputs; onnxruntime's outputs for the final graph must match torch's
    within atol + rtol * (largest |output|); by default (None) they follow the dtype that runs
    (runtime.TOLERANCES: float32 1e-4/1e-5, fp16 1e-2/1e-3, bf16 8e-2/8e-3). Where onnxruntime's
    CPU provider cannot run the graphs' dtype (bfloat16 Gemm or Conv), that row and the latency
    run float32 copies of both models, say so, and still count:
    the graph rows compare the exports in the models' own dtype. The reference may be the user's
    own model object: with `same_weights` (default) a copy of it gets the final model's values
    before export, since the exporter's optimizer folds by value, e.g. drops an all-zero bias.
    Latency is measured interleaved and reported, not checked: the machines are noisy. Run it
    with `optimize=False` too: constant folding can hide a leftover Mul(W, M) in an unnamed
    initializer, which the name check catches.
    """
    args = as_args(example_args)
    final_state = final_model.state_dict()
    state_checks, state_diffs = state_dict_checks(reference_model.state_dict(), final_state)
    if same_weights:
        reference_model = _same_weights(reference_model, final_state)
    ref = export_onnx(reference_model, args, optimize=optimize, fold=False)
    fin = export_onnx(final_model, args, optimize=optimize, fold=False)
    comparison = compare_onnx(ref, fin)
    diffs = comparison.differences + state_diffs
    rt = runtime.sessions_for(reference_model, final_model, args, ref, fin, optimize)
    parity, max_diff, tolerance = _parity(rt, rtol, atol, diffs)
    ref_ms, fin_ms = runtime.latency_ms(rt, latency_runs)
    notes = []
    if rt.float32_copy:
        notes.append(f"onnxruntime's CPUExecutionProvider cannot run these graphs ({rt.float32_copy}); "
                     "its parity and latency rows ran float32 copies of both models; the graph and state_dict "
                     "rows compare the models in their own dtype")
    return ZeroOverheadReport(
        [*comparison.checks, *state_checks, parity], diffs, max_diff, tolerance,
        fin_ms / ref_ms if ref_ms else float("nan"), (ref_ms, fin_ms), notes, bool(rt.float32_copy),
    )
