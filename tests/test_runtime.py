"""dsd_fx.proof.runtime: onnxruntime sessions, feeds, parity and latency."""
from __future__ import annotations

import copy

import pytest
import torch

import dsd_fx
from conftest import TinyMLP, mlp_args
from dsd_fx.proof import runtime


def test_feeds_name_a_count_mismatch():
    sess = runtime.session(dsd_fx.export_onnx(TinyMLP(), mlp_args()))
    assert list(runtime.feeds(sess, mlp_args())) == [sess.get_inputs()[0].name]
    with pytest.raises(ValueError, match="takes 1 inputs but the example args hold 2 tensors"):
        runtime.feeds(sess, (torch.randn(5, 8), torch.randn(5, 8)))


def test_parity_and_latency_of_the_exports_themselves():
    model = TinyMLP()
    args = mlp_args()
    proto = dsd_fx.export_onnx(model, args)
    rt = runtime.sessions_for(model, copy.deepcopy(model), args, proto, proto, optimize=True)
    assert rt.float32_copy == "" and rt.args is args
    max_diff, scale, mismatch = runtime.max_abs_diff(rt)
    with torch.no_grad():
        assert scale == pytest.approx(float(model(*args).abs().max()))
    assert max_diff < 1e-5 and mismatch is None
    ref_ms, fin_ms = runtime.latency_ms(rt, runs=3)
    assert ref_ms > 0 and fin_ms > 0


def test_bf16_runs_on_float32_copies_saying_why():
    model = TinyMLP().to(torch.bfloat16)
    args = (torch.randn(5, 8, dtype=torch.bfloat16),)
    proto = dsd_fx.export_onnx(model, args)
    rt = runtime.sessions_for(model, model, args, proto, proto, optimize=True)
    assert rt.float32_copy.startswith("bfloat16: ") and "Gemm" in rt.float32_copy
    assert rt.model is not model and rt.model.fc1.weight.dtype == torch.float32 and rt.args[0].dtype == torch.float32
    assert model.fc1.weight.dtype == torch.bfloat16  # the user's model is untouched
