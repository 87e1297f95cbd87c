"""Export to ONNX and prove zero overhead: a translation, never a rewrite of the training graph."""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import networkx as nx
import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx
from torch.utils._pytree import tree_flatten

from dsd_fx.tags import has_dsd_nodes


def _as_tuple(example_args: Any) -> tuple:
    return example_args if isinstance(example_args, tuple) else (example_args,)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in modes:
            m.training = was


@contextlib.contextmanager
def _quiet_exporter():
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(
    model: torch.nn.Module,
    example_args: Any,
    path: str | os.PathLike | None = None,
    *,
    optimize: bool = True,
    fold: bool = True,
    opset_version: int | None = None,
) -> onnx.ModelProto:
    """Export `model` (any phase) with the torch.onnx dynamo exporter, in eval mode.

    A sparse-phase graph is first folded: its masks are multiplied into a *copy* of the weights
    (the re-dense rewrite on a copy), so the file has no `Mul` per layer and the training graph
    is untouched. `fold=False` exports the graph as it is. With `path`, the file is written
    atomically (a temporary file renamed into place), so an interrupted export leaves no partial file.
    """
    if fold and isinstance(model, fx.GraphModule) and has_dsd_nodes(model.graph):
        from dsd_fx.passes.fold_masks import fold_masks

        model = copy.deepcopy(model)
        fold_masks(model)
    args = _as_tuple(example_args)
    with _eval_mode(model), _quiet_exporter():
        program = torch.onnx.export(
            model, args, dynamo=True, optimize=optimize, verbose=False, opset_version=opset_version, external_data=False
        )
    proto = program.model_proto
    if path is not None:
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".dsd_fx-", suffix=".onnx.part", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(proto.SerializeToString())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return proto


# ---------------------------------------------------------------- comparison


def _attr_label(node: onnx.NodeProto) -> tuple:
    out = []
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode(errors="replace")
        elif isinstance(v, (list, tuple)):
            v = tuple(x.decode(errors="replace") if isinstance(x, bytes) else x for x in v)
        elif not isinstance(v, (int, float, str)):
            v = type(v).__name__  # tensors and graphs: compared by kind only
        out.append((a.name, v))
    return tuple(sorted(out))


def _op(node: onnx.NodeProto) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _initializers(proto: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], str, int]]:
    out = {}
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        out[init.name] = (tuple(init.dims), onnx.TensorProto.DataType.Name(init.data_type), int(arr.nbytes))
    return out


def _value_infos(values) -> list[tuple[tuple, str]]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
        out.append((dims, onnx.TensorProto.DataType.Name(t.elem_type)))
    return out


def onnx_to_nx(proto: onnx.ModelProto) -> nx.DiGraph:
    """An ONNX graph as networkx, for the isomorphism check and for diffs.

    Nodes: ops labelled by op type and attributes, graph inputs by position, initializers by name,
    shape and dtype, outputs by position. Edges carry the argument positions (`slots`; `pos` is
    the first), so wiring counts, not just node labels.
    """
    g = nx.DiGraph()
    producer: dict[str, str] = {}
    for i, v in enumerate(proto.graph.input):
        g.add_node(f"input:{v.name}", label=("input", i), kind="input", op="input")
        producer[v.name] = f"input:{v.name}"
    for name, (dims, dtype, _) in _initializers(proto).items():
        g.add_node(f"init:{name}", label=("init", name, dims, dtype), kind="initializer", op="init")
        producer[name] = f"init:{name}"
    keys = []
    for k, node in enumerate(proto.graph.node):
        key = node.name or f"{node.op_type}_{k}"
        keys.append(key)
        g.add_node(key, label=("op", _op(node), _attr_label(node)), kind=_op(node), op="node")
        for out in node.output:
            producer[out] = key
    for key, node in zip(keys, proto.graph.node):
        for slot, name in enumerate(node.input):
            if name and name in producer:
                src = producer[name]
                if g.has_edge(src, key):
                    g.edges[src, key]["slots"] += (slot,)
                else:
                    g.add_edge(src, key, slots=(slot,), pos=slot)
    for i, v in enumerate(proto.graph.output):
        g.add_node(f"output:{i}", label=("output", i), kind="output", op="output")
        if v.name in producer:
            g.add_edge(producer[v.name], f"output:{i}", slots=(0,), pos=0)
    return g


@dataclass
class Check:
    name: str
    reference: str
    final: str
    ok: bool


@dataclass
class OnnxComparison:
    checks: list[Check]
    differences: list[str]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def _describe(node: onnx.NodeProto) -> str:
    return f"node '{node.name}' ({_op(node)}) reading {', '.join(i for i in node.input if i) or 'nothing'}"


def compare_onnx(reference: onnx.ModelProto, final: onnx.ModelProto) -> OnnxComparison:
    """Compare two ONNX graphs node by node: count, op types, isomorphism, initializers, I/O."""
    checks: list[Check] = []
    diffs: list[str] = []
    rn, fn = list(reference.graph.node), list(final.graph.node)
    checks.append(Check("node count", str(len(rn)), str(len(fn)), len(rn) == len(fn)))
    rc, fc = Counter(map(_op, rn)), Counter(map(_op, fn))
    checks.append(Check("op types", _fmt_counter(rc), _fmt_counter(fc), rc == fc))
    for op, extra in (fc - rc).items():
        nodes = [n for n in fn if _op(n) == op]
        # name the extra nodes: those whose inputs differ from every reference node of the op
        ref_inputs = Counter(tuple(n.input) for n in rn if _op(n) == op)
        suspects = [n for n in nodes if not ref_inputs.get(tuple(n.input))] or nodes
        for n in suspects[:extra]:
            diffs.append(f"extra {_describe(n)}")
    for op, missing in (rc - fc).items():
        diffs.append(f"missing {missing} x {op}")
    ri, fi = _initializers(reference), _initializers(final)
    checks.append(Check("initializer names", f"{len(ri)} names", f"{len(fi)} names", set(ri) == set(fi)))
    for name in sorted(set(fi) - set(ri)):
        diffs.append(f"extra initializer '{name}' {fi[name][0]} {fi[name][1]}")
    for name in sorted(set(ri) - set(fi)):
        diffs.append(f"missing initializer '{name}' {ri[name][0]} {ri[name][1]}")
    shape_ok = all(ri[n][:2] == fi[n][:2] for n in set(ri) & set(fi))
    for n in sorted(set(ri) & set(fi)):
        if ri[n][:2] != fi[n][:2]:
            diffs.append(f"initializer '{n}': {ri[n][0]} {ri[n][1]} in reference, {fi[n][0]} {fi[n][1]} in final")
    checks.append(Check("initializer shapes and dtypes", "", "", shape_ok))
    rb, fb = sum(v[2] for v in ri.values()), sum(v[2] for v in fi.values())
    checks.append(Check("initializer bytes", f"{rb:,}", f"{fb:,}", rb == fb))
    rio = (_value_infos(reference.graph.input), _value_infos(reference.graph.output))
    fio = (_value_infos(final.graph.input), _value_infos(final.graph.output))
    checks.append(Check("inputs and outputs", f"{len(rio[0])} in, {len(rio[1])} out", f"{len(fio[0])} in, {len(fio[1])} out", rio == fio))
    if rio != fio:
        diffs.append(f"inputs/outputs differ: {rio} vs {fio}")
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


def _fmt_counter(c: Counter) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(c.items()))


# ---------------------------------------------------------------- the proof


@dataclass
class ZeroOverheadReport:
    """The result of verify_zero_overhead: `.ok`, the checks, and a readable `.table`."""

    checks: list[Check]
    differences: list[str]
    max_abs_diff: float
    tolerance: float
    latency_ratio: float
    latency_ms: tuple[float, float]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def table(self) -> str:
        rows = [("check", "reference", "final", "ok")]
        rows += [(c.name, c.reference, c.final, "yes" if c.ok else "NO") for c in self.checks]
        rows.append(
            ("onnxruntime latency (median)", f"{self.latency_ms[0]:.3f} ms", f"{self.latency_ms[1]:.3f} ms",
             f"ratio {self.latency_ratio:.3f} (not checked)")
        )
        widths = [min(60, max(len(r[i]) for r in rows)) for i in range(4)]
        lines = []
        for k, r in enumerate(rows):
            lines.append(" | ".join(str(x)[:60].ljust(w) for x, w in zip(r, widths)).rstrip())
            if k == 0:
                lines.append("-+-".join("-" * w for w in widths))
        lines.append(f"zero overhead: {'PROVEN' if self.ok else 'NOT PROVEN'}")
        lines += [f"  - {d}" for d in self.differences]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table


def _ort_session(proto: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _feeds(session, args: Sequence[Any]) -> dict[str, np.ndarray]:
    flat = [a for a in tree_flatten(list(args))[0] if isinstance(a, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(flat):
        raise ValueError(f"the ONNX graph takes {len(names)} inputs but the example args hold {len(flat)} tensors")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, flat)}


def verify_zero_overhead(
    reference_model: torch.nn.Module,
    final_model: torch.nn.Module,
    example_args: Any,
    *,
    optimize: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    latency_runs: int = 30,
    same_weights: bool = True,
) -> ZeroOverheadReport:
    """Prove that `final_model` costs nothing more at inference than `reference_model`.

    Both are exported the same way (`fold=False`: a mask left in `final_model` stays visible);
    the ONNX graphs must match node by node (count, op types, isomorphism), in initializer names,
    shapes, dtypes and bytes, and in inputs and outputs; onnxruntime's outputs for the final graph
    must match torch's within rtol/atol. The reference may be the user's own model object: its
    architecture is what counts: with `same_weights` (default) a copy of it gets the final
    model's weight values before export, since the exporter's optimizer folds by value, e.g. drops
    an all-zero bias. Latency is measured interleaved and
    reported, not checked: the machines are noisy. Run it with `optimize=False` too: constant
    folding can hide a leftover Mul(W, M) in an unnamed initializer, which the name check catches.
    """
    args = _as_tuple(example_args)
    weight_notes = []
    if same_weights:
        # The exporter's optimizer folds by value (a zero bias can vanish): give the reference the
        # final model's values, so that any difference left is one of structure.
        reference_model = copy.deepcopy(reference_model)
        final_state = final_model.state_dict()
        ref_state = reference_model.state_dict()
        loadable = {k: v for k, v in final_state.items() if k in ref_state and ref_state[k].shape == v.shape}
        reference_model.load_state_dict(loadable, strict=False)
        weight_notes = [f"state_dict key '{k}' only in final" for k in final_state if k not in ref_state]
        weight_notes += [f"state_dict key '{k}' only in reference" for k in ref_state if k not in final_state]
    ref = export_onnx(reference_model, args, optimize=optimize, fold=False)
    fin = export_onnx(final_model, args, optimize=optimize, fold=False)
    comparison = compare_onnx(ref, fin)
    comparison.differences.extend(weight_notes)
    ref_sess, fin_sess = _ort_session(ref), _ort_session(fin)
    feeds = _feeds(fin_sess, args)
    ort_out = fin_sess.run(None, feeds)
    with _eval_mode(final_model), torch.no_grad():
        torch_out = [t for t in tree_flatten(final_model(*args))[0] if isinstance(t, torch.Tensor)]
    max_diff, scale = 0.0, 0.0
    if len(torch_out) != len(ort_out):
        comparison.differences.append(f"onnxruntime gave {len(ort_out)} outputs, torch {len(torch_out)}")
        max_diff = float("inf")
    for t, o in zip(torch_out, ort_out):
        t = t.detach().float().cpu().numpy()
        max_diff = max(max_diff, float(np.max(np.abs(t - o.astype(np.float32)))) if t.size else 0.0)
        scale = max(scale, float(np.max(np.abs(t))) if t.size else 0.0)
    tolerance = atol + rtol * scale
    checks = comparison.checks + [
        Check("onnxruntime vs torch max |diff|", f"tol {tolerance:.2e}", f"{max_diff:.2e}", max_diff <= tolerance)
    ]
    ref_feeds = _feeds(ref_sess, args)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(2):  # warm-up
        ref_sess.run(None, ref_feeds), fin_sess.run(None, feeds)
    for _ in range(latency_runs):
        for k, (s, f) in enumerate(((ref_sess, ref_feeds), (fin_sess, feeds))):
            t0 = time.perf_counter()
            s.run(None, f)
            times[k].append(time.perf_counter() - t0)
    ref_ms, fin_ms = statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3
    return ZeroOverheadReport(
        checks, comparison.differences, max_diff, tolerance, fin_ms / ref_ms if ref_ms else float("nan"), (ref_ms, fin_ms)
    )
