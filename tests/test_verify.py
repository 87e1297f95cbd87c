"""dsd_fx.proof.zero_overhead: the zero-overhead proof and the ONNX comparison."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch import fx

import dsd_fx
from conftest import TinyCNN, TinyMLP, cnn_args, mlp_args
from dsd_fx.proof.zero_overhead import compare_onnx, verify_zero_overhead


@pytest.mark.parametrize("optimize", [True, False])
@pytest.mark.parametrize("make", [(TinyMLP, mlp_args), (TinyCNN, cnn_args)])
def test_zero_overhead_after_redense(make, optimize):
    cls, make_args = make
    model = cls()
    reference = copy.deepcopy(model)
    sparse = dsd_fx.transform(model, sparsity=0.5)
    sparse(*make_args()).sum().backward()
    dense = dsd_fx.transform(sparse, phase="dense")
    report = verify_zero_overhead(reference, dense, make_args(), optimize=optimize, latency_runs=5)
    assert report.ok, report.table
    assert "PROVEN" in report.table and report.max_abs_diff <= report.tolerance


def test_users_own_model_object_is_a_valid_reference():
    model = TinyMLP()
    dense = dsd_fx.transform(dsd_fx.transform(model), phase="dense")
    assert verify_zero_overhead(model, dense, mlp_args(), latency_runs=3).ok


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
    report = verify_zero_overhead(model, bad, mlp_args(), optimize=optimize, latency_runs=3)
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
    report = verify_zero_overhead(model, sparse, mlp_args(), optimize=False, latency_runs=3)
    assert not report.ok and sum("(Mul)" in d for d in report.differences) == 2


def test_onnxruntime_parity_is_checked():
    model = TinyMLP()
    dense = dsd_fx.transform(dsd_fx.transform(copy.deepcopy(model)), phase="dense")
    report = verify_zero_overhead(model, dense, mlp_args(), latency_runs=3)
    row = next(c for c in report.checks if c.name.startswith("onnxruntime"))
    assert row.ok and report.max_abs_diff < 1e-4


def _check(report, name: str):
    return next(c for c in report.checks if c.name == name)


def test_a_state_dict_key_only_in_final_fails_the_proof():
    reference = nn.Sequential(nn.Linear(8, 4))
    final = copy.deepcopy(reference)
    final[0].register_buffer("weight_mask", torch.ones_like(final[0].weight))  # unused: absent from the ONNX file
    report = verify_zero_overhead(reference, final, (torch.randn(2, 8),), latency_runs=2)
    assert not report.ok and "zero overhead: NOT PROVEN" in report.table
    row = _check(report, "state_dict keys")
    assert not row.ok and (row.reference, row.final) == ("2 keys", "3 keys")
    assert "state_dict key '0.weight_mask' only in final" in report.differences
    assert _check(report, "graph isomorphism").ok  # the ONNX graphs alone would not show it


def test_a_state_dict_key_only_in_reference_fails_the_proof():
    reference = nn.Sequential(nn.Linear(8, 4))
    reference[0].register_buffer("scale", torch.ones(4))
    final = nn.Sequential(nn.Linear(8, 4))
    report = verify_zero_overhead(reference, final, (torch.randn(2, 8),), latency_runs=2)
    assert not report.ok and not _check(report, "state_dict keys").ok
    assert "state_dict key '0.scale' only in reference" in report.differences


class _WithTable(nn.Module):
    """A linear layer and a parameter the forward never reads (so the ONNX file never holds it)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.table = nn.Parameter(torch.zeros(size))

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("same_weights", [True, False])
def test_a_weight_of_another_shape_fails_the_proof(same_weights):
    report = verify_zero_overhead(_WithTable(3), _WithTable(5), (torch.randn(2, 8),), latency_runs=2, same_weights=same_weights)
    assert not report.ok and "NOT PROVEN" in report.table
    assert not _check(report, "state_dict shapes and dtypes").ok and _check(report, "state_dict keys").ok
    assert "state_dict 'table': (3,) float32 in reference, (5,) float32 in final" in report.differences


def test_a_weight_of_another_dtype_fails_the_proof():
    final = _WithTable(3)
    final.table.data = final.table.data.double()
    report = verify_zero_overhead(_WithTable(3), final, (torch.randn(2, 8),), latency_runs=2)
    assert not report.ok
    assert "state_dict 'table': (3,) float32 in reference, (3,) float64 in final" in report.differences


def test_same_state_dict_is_proven_and_listed():
    model = TinyMLP()
    dense = dsd_fx.transform(dsd_fx.transform(copy.deepcopy(model)), phase="dense")
    report = verify_zero_overhead(model, dense, mlp_args(), latency_runs=2)
    assert report.ok, report.table
    row = _check(report, "state_dict keys")
    assert row.ok and row.reference == row.final == "4 keys"
    assert _check(report, "state_dict shapes and dtypes").ok


def _bf16(model: nn.Module) -> nn.Module:
    return model.to(torch.bfloat16)


def test_bf16_model_is_compared_and_onnxruntime_runs_a_float32_copy():
    model = _bf16(TinyMLP())
    dense = dsd_fx.transform(dsd_fx.transform(copy.deepcopy(model)), phase="dense")
    args = (torch.randn(5, 8, dtype=torch.bfloat16),)
    report = verify_zero_overhead(model, dense, args, latency_runs=2)
    assert report.ok, report.table
    row = next(c for c in report.checks if c.name.startswith("onnxruntime"))
    assert row.ok and "float32 copy" in row.name and "bfloat16" in row.reference
    assert "float32 copy" in report.table
    assert _check(report, "initializer shapes and dtypes").ok  # the graphs compared are the bf16 ones
    assert report.onnxruntime_float32_copy and "bfloat16" in report.notes[0]


def test_bf16_leftover_mask_still_fails():
    model = _bf16(TinyMLP())
    sparse = dsd_fx.transform(copy.deepcopy(model))
    report = verify_zero_overhead(model, sparse, (torch.randn(5, 8, dtype=torch.bfloat16),), optimize=False, latency_runs=2)
    assert not report.ok and sum("(Mul)" in d for d in report.differences) == 2


def test_float32_model_runs_onnxruntime_as_it_is():
    model = TinyMLP()
    report = verify_zero_overhead(model, copy.deepcopy(model), mlp_args(), latency_runs=2)
    assert report.ok and not report.onnxruntime_float32_copy and not report.notes
    assert "float32 copy" not in report.table


def test_compare_onnx_names_an_extra_initializer():
    model = TinyMLP()
    ref = dsd_fx.export_onnx(model, mlp_args())
    raw = dsd_fx.export_onnx(dsd_fx.transform(copy.deepcopy(model)), mlp_args(), fold=False, optimize=False)
    result = compare_onnx(ref, raw)
    assert not result.ok and "extra initializer 'fc1.weight_mask' (16, 8) FLOAT" in result.differences


def test_fp16_model_against_its_own_copy_is_proven_with_a_tolerance_for_fp16():
    # fp16 rounds every intermediate: float32's tolerance refused correct models (issue 19)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).half()
    args = (torch.randn(8, 16).half(),)
    report = verify_zero_overhead(model, copy.deepcopy(model), args, latency_runs=2)
    assert report.ok, report.table
    assert not report.onnxruntime_float32_copy and report.tolerance >= 1e-3
    explicit = verify_zero_overhead(model, copy.deepcopy(model), args, rtol=1e-4, atol=1e-5, latency_runs=2)
    assert explicit.tolerance < 1e-4  # the caller's own tolerance still rules


def test_bf16_conv_runs_onnxruntime_on_a_float32_copy():
    # onnxruntime refuses a bf16 Conv with INVALID_GRAPH (a type error), not NOT_IMPLEMENTED as for Gemm
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).bfloat16()
    report = verify_zero_overhead(model, copy.deepcopy(model), (torch.randn(2, 3, 8, 8).bfloat16(),), latency_runs=2)
    assert report.ok, report.table
    assert report.onnxruntime_float32_copy and "bfloat16" in report.notes[0]


def test_compare_onnx_and_diff_onnx_take_protos_or_paths_and_refuse_an_empty_file(tmp_path):
    model = TinyMLP()
    ref = dsd_fx.export_onnx(model, mlp_args(), tmp_path / "ref.onnx")
    raw = dsd_fx.export_onnx(dsd_fx.transform(copy.deepcopy(model)), mlp_args(), tmp_path / "raw.onnx", fold=False)
    by_proto, by_path = compare_onnx(ref, raw), compare_onnx(str(tmp_path / "ref.onnx"), tmp_path / "raw.onnx")
    assert not by_path.ok and by_path.differences == by_proto.differences
    assert compare_onnx(tmp_path / "ref.onnx", ref).ok
    assert dsd_fx.diff_onnx(ref, tmp_path / "raw.onnx").summary == dsd_fx.diff_onnx(tmp_path / "ref.onnx", raw).summary
    (tmp_path / "empty.onnx").write_bytes(b"")
    for call in (compare_onnx, dsd_fx.diff_onnx):
        with pytest.raises(ValueError, match="empty.onnx is not an ONNX model: it is empty"):
            call(ref, tmp_path / "empty.onnx")
