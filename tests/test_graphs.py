"""dsd_fx.diagnostics.graphs: fx and ONNX graphs as networkx, and structural matching."""
from __future__ import annotations

import ast
import copy
import pathlib

import networkx as nx
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx

import dsd_fx
from conftest import TinyMLP
from dsd_fx.diagnostics.graphs import fx_to_nx, match_graphs, onnx_to_nx

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dsd_fx"


def _dsd_fx_imports(module: str) -> set[str]:
    """Every dsd_fx module that `module` imports, at module or function level, read from its source."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dsd_fx":
            package = (PACKAGE.parent / node.module.replace(".", "/")).is_dir()  # `from dsd_fx.folder import module`
            found |= {f"{node.module}.{a.name}" for a in node.names} if package else {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "dsd_fx"}
    return found


def test_graphs_and_draw_are_leaves():
    assert _dsd_fx_imports("diagnostics/graphs") == set()
    assert _dsd_fx_imports("diagnostics/draw") == set()


def test_diff_imports_only_the_leaves():
    assert _dsd_fx_imports("diagnostics/graph_diff") == {"dsd_fx.diagnostics.draw", "dsd_fx.diagnostics.graphs"}


def test_fx_to_nx_labels_and_argument_positions():
    gm = fx.symbolic_trace(TinyMLP())
    g = fx_to_nx(gm)
    assert list(g.nodes) == [n.name for n in gm.graph.nodes] == ["x", "fc1", "relu", "fc2", "output"]
    assert g.nodes["fc1"]["label"] == ("call_module", "fc1") and g.nodes["fc1"]["kind"] == "call_module Linear"
    assert g.nodes["relu"]["label"] == ("call_function", "relu") and g.nodes["relu"]["kind"] == "relu"
    assert g.nodes["x"]["op"] == "placeholder"
    assert sorted(g.edges(data="pos")) == [("fc1", "relu", 0), ("fc2", "output", 0), ("relu", "fc2", 0), ("x", "fc1", 0)]


def test_match_is_structural_not_by_name():
    g = fx_to_nx(fx.symbolic_trace(TinyMLP()))
    renamed = nx.relabel_nodes(g, {n: f"other_{n}" for n in g})
    matched, changed = match_graphs(g, renamed)
    assert matched == {n: f"other_{n}" for n in g} and changed == {}


def test_match_pairs_a_replaced_op_and_skips_inserted_wrappers():
    model = TinyMLP()
    before = fx_to_nx(fx.symbolic_trace(model))
    after = fx_to_nx(dsd_fx.transform(copy.deepcopy(model)))
    matched, changed = match_graphs(before, after)
    assert changed == {"fc1": "linear", "fc2": "linear_1"}  # call_module -> F.linear at the same place
    assert matched == {"x": "x", "relu": "relu", "output": "output"}
    new = set(after) - set(matched.values()) - set(changed.values())
    assert new == {"fc1_weight", "fc1_weight_mask", "mask_mul", "fc1_bias",
                   "fc2_weight", "fc2_weight_mask", "mask_mul_1", "fc2_bias"}


def _model(extra_mul: bool) -> onnx.ModelProto:
    """x -> Gemm(x, W, B) -> Relu -> y, and with `extra_mul` a Mul(h, h) reading one value twice."""
    w = numpy_helper.from_array(torch.ones(4, 3).numpy(), "W")
    b = numpy_helper.from_array(torch.zeros(4).numpy(), "B")
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["h"], name="gemm", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu")]
    if extra_mul:
        nodes.append(helper.make_node("Mul", ["r", "r"], ["y"], name="square"))
    else:
        nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], initializer=[w, b])
    return helper.make_model(graph)


def test_onnx_to_nx_nodes_and_slots():
    g = onnx_to_nx(_model(extra_mul=True))
    assert g.nodes["input:x"]["label"] == ("input", 0)
    assert g.nodes["init:W"]["label"] == ("init", "W", (4, 3), "FLOAT")
    assert g.nodes["gemm"]["label"] == ("op", "Gemm", (("transB", 1),))
    assert [g.edges[u, "gemm"]["slots"] for u in ("input:x", "init:W", "init:B")] == [(0,), (1,), (2,)]
    assert g.edges["relu", "square"]["slots"] == (0, 1)  # one edge, both argument slots
    assert g.has_edge("square", "output:0")


def test_onnx_diff_of_an_extra_node():
    d = dsd_fx.diff_onnx(_model(extra_mul=False), _model(extra_mul=True))
    assert d.added == ["square"] and not d.removed and not d.changed
