import copy
import os

import onnx
import pytest
import torch
from torch import fx

import dsd_fx
from conftest import TinyCNN, TinyMLP, cnn_args, mlp_args


def test_sparse_export_folds_masks(tmp_path):
    model = TinyMLP()
    sparse = dsd_fx.transform(model)
    code_before = sparse.code
    path = tmp_path / "s.onnx"
    proto = dsd_fx.export_onnx(sparse, mlp_args(), path, optimize=False)
    assert [n.op_type for n in proto.graph.node].count("Mul") == 0
    assert sorted(i.name for i in proto.graph.initializer) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    assert sparse.code == code_before  # export never rewrites the training graph
    assert onnx.load(str(path)).graph.node  # the file is complete
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]


@pytest.mark.parametrize("optimize", [True, False])
@pytest.mark.parametrize("make", [(TinyMLP, mlp_args), (TinyCNN, cnn_args)])
def test_zero_overhead_after_redense(make, optimize):
    cls, make_args = make
    model = cls()
    reference = copy.deepcopy(model)
    sparse = dsd_fx.transform(model, sparsity=0.5)
    sparse(*make_args()).sum().backward()
    dense = dsd_fx.transform(sparse, phase="dense")
    report = dsd_fx.verify_zero_overhead(reference, dense, make_args(), optimize=optimize, latency_runs=5)
    assert report.ok, report.table
    assert "PROVEN" in report.table and report.max_abs_diff <= report.tolerance


def test_users_own_model_object_is_a_valid_reference():
    model = TinyMLP()
    dense = dsd_fx.transform(dsd_fx.transform(model), phase="dense")
    assert dsd_fx.verify_zero_overhead(model, dense, mlp_args(), latency_runs=3).ok


def _leave_one_mask(dense: fx.GraphModule) -> fx.GraphModule:
    """A final graph with a single leftover, untagged Mul(W, M) on fc2, built by hand."""
    gm = copy.deepcopy(dense)
    gm.fc2.register_buffer("weight_mask", torch.ones_like(gm.fc2.weight))
    g = gm.graph
    node = next(n for n in g.nodes if n.target == "fc2")
    with g.inserting_before(node):
        w, m = g.get_attr("fc2.weight"), g.get_attr("fc2.weight_mask")
        mul = g.call_function(torch.mul, (w, m))
        b = g.get_attr("fc2.bias")
        lin = g.call_function(torch.nn.functional.linear, (node.args[0], mul, b))
    node.replace_all_uses_with(lin)
    g.erase_node(node)
    gm.recompile()
    return gm


@pytest.mark.parametrize("optimize", [True, False])
def test_a_single_leftover_mask_fails_the_proof(optimize):
    model = TinyMLP()
    dense = dsd_fx.transform(dsd_fx.transform(copy.deepcopy(model)), phase="dense")
    bad = _leave_one_mask(dense)
    report = dsd_fx.verify_zero_overhead(model, bad, mlp_args(), optimize=optimize, latency_runs=3)
    assert not report.ok
    text = "\n".join(report.differences)
    if optimize:  # folding bakes Mul(W, M) into an unnamed initializer: the name check catches it
        assert "missing initializer 'fc2.weight'" in text
    else:
        assert "extra node" in text and "(Mul) reading fc2.weight, fc2.weight_mask" in text
        assert "extra initializer 'fc2.weight_mask'" in text
    assert "NOT PROVEN" in report.table


def test_sparse_graph_itself_is_not_zero_overhead():
    model = TinyMLP()
    sparse = dsd_fx.transform(copy.deepcopy(model))
    report = dsd_fx.verify_zero_overhead(model, sparse, mlp_args(), optimize=False, latency_runs=3)
    assert not report.ok and sum("(Mul)" in d for d in report.differences) == 2


def test_onnxruntime_parity_is_checked():
    model = TinyMLP()
    dense = dsd_fx.transform(dsd_fx.transform(copy.deepcopy(model)), phase="dense")
    report = dsd_fx.verify_zero_overhead(model, dense, mlp_args(), latency_runs=3)
    row = next(c for c in report.checks if c.name.startswith("onnxruntime"))
    assert row.ok and report.max_abs_diff < 1e-4


def test_export_leaves_training_mode_alone():
    model = TinyMLP().train()
    dsd_fx.export_onnx(model, mlp_args())
    assert model.training and model.fc1.training
