"""dsd_fx.cost and verify_pruned: params and MACs from the graph, and the ONNX proof of a pruned model."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dsd_fx.channels.macs import cost
from dsd_fx.phases import transform
from dsd_fx.proof.pruned import verify_pruned
from tests.channel_models import Dense, FlatCNN, Inception, InvertedResidual, MLPBlock, ResBlock

IMG = torch.randn(2, 3, 8, 8)
STRUCTURES = [(InvertedResidual, (2, 3, 8, 8)), (Inception, (2, 3, 8, 8)), (Dense, (2, 3, 8, 8)), (FlatCNN, (2, 3, 5, 5))]


def test_cost_counts_params_and_macs_from_the_graph():
    c = cost(ResBlock(), IMG)
    # stem 2*8*8*8 * 3*9, c1 2*16*4*4 * 8*9, c2 512 * 16*9, down 512 * 8, dw 512 * 9, fc 2*10 * 256
    assert c.macs == 27648 + 36864 + 73728 + 4096 + 4608 + 5120
    assert c.params == 224 + 16 + 1168 + 32 + 2320 + 32 + 144 + 32 + 160 + 2570


def test_verify_pruned_proves_the_pruned_onnx():
    model = ResBlock()
    gm = transform(model, phase="prune", channels=0.25, example_args=(IMG,))
    report = verify_pruned(model, gm, IMG, latency_runs=3)
    assert report.ok, report.table
    assert "PROVEN" in report.table and report.ratios["macs"] < 0.7 and report.ratios["params"] < 0.7


class _Sliced(MLPBlock):
    """What pruning must not produce: the same function through a Slice of the hidden layer."""

    def __init__(self):
        super().__init__(hidden=64)
        self.fc2 = nn.Linear(48, 16)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x)))[..., :48])


def test_verify_pruned_fails_on_an_added_slice():
    report = verify_pruned(MLPBlock(), _Sliced(), torch.randn(2, 5, 16), latency_runs=1)
    assert not report.ok
    row = next(r for r in report.rows if r.name == "indexing ops added")
    assert not row.ok and "Slice +1" in row.pruned


@pytest.mark.parametrize("make, shape", STRUCTURES, ids=[m.__name__ for m, _ in STRUCTURES])
def test_pruned_onnx_of_each_structure_is_proven(make, shape):
    model, x = make().eval(), torch.randn(*shape)
    gm = transform(model, phase="prune", channels=0.25, example_args=(x,))
    report = verify_pruned(model, gm, x, latency_runs=1)
    assert report.ok, report.table


def test_verify_pruned_of_an_fp16_model_uses_an_fp16_tolerance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).half()
    x = torch.randn(8, 16).half()
    pruned = transform(model, phase="prune", channels=0.25, example_args=(x,))
    report = verify_pruned(model, pruned, x, latency_runs=1)
    assert report.ok, report.table
    row = next(r for r in report.rows if r.name.startswith("onnxruntime"))
    assert float(row.original.split()[1]) >= 1e-3


def test_verify_pruned_of_a_bf16_conv_runs_onnxruntime_on_a_float32_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).bfloat16()
    x = torch.randn(2, 3, 8, 8).bfloat16()
    pruned = transform(model, phase="prune", channels=0.25, example_args=(x,))
    report = verify_pruned(model, pruned, x, latency_runs=1)
    assert report.ok, report.table
    assert any(r.name.endswith("(float32 copy)") for r in report.rows)
