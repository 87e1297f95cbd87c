"""The one record of a sparse graph: masks_of reads it in every mode; it survives deepcopy and torch.load."""
import copy
import io

import pytest
import torch

import dsd_fx
from conftest import TinyMLP
from dsd_fx.state import MaskKind

MODES = {
    "magnitude": ({"sparsity": 0.5}, MaskKind.BUFFER),
    "fixed 2:4": ({"pattern": "2:4"}, MaskKind.BUFFER),
    "sr-ste": ({"pattern": "2:4", "method": "sr-ste"}, MaskKind.DYNAMIC),
    "packed": ({"pattern": "2:4", "pack": True}, MaskKind.PACKED),
}


@pytest.mark.parametrize("mode", MODES)
def test_masks_of_every_mode(mode):
    options, kind = MODES[mode]
    sparse = dsd_fx.transform(TinyMLP(), **options)
    records = dsd_fx.masks_of(sparse)
    assert [(r.weight, r.kind) for r in records] == [("fc1.weight", kind), ("fc2.weight", kind)]
    if kind is MaskKind.BUFFER:
        assert [r.buffer for r in records] == ["fc1.weight_mask", "fc2.weight_mask"]
    if "pattern" in options:
        assert all((r.n, r.m, r.dim) == (2, 4, 1) for r in records)


@pytest.mark.parametrize("mode", MODES)
def test_the_record_survives_deepcopy_and_torch_load(mode):
    sparse = dsd_fx.transform(TinyMLP(), **MODES[mode][0])
    buf = io.BytesIO()
    torch.save(sparse, buf)
    buf.seek(0)
    for other in (copy.deepcopy(sparse), torch.load(buf, weights_only=False)):
        assert [(r.weight, r.kind) for r in dsd_fx.masks_of(other)] == [(r.weight, r.kind) for r in dsd_fx.masks_of(sparse)]
        x = torch.randn(3, 8)
        torch.testing.assert_close(dsd_fx.transform(other, phase="dense")(x), other(x))


def test_a_dense_model_has_no_record():
    assert dsd_fx.masks_of(TinyMLP()) == []
    assert dsd_fx.masks_of(dsd_fx.transform(dsd_fx.transform(TinyMLP()), phase="dense")) == []


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("mode", MODES)
def test_tied_weights_survive_torch_load(mode):
    """torch.load re-traces the code and reads the tied weight once, under one name: tags still match."""
    torch.manual_seed(0)
    sparse = dsd_fx.transform(Tied(), **MODES[mode][0])
    x = torch.randn(2, 8)
    buf = io.BytesIO()
    torch.save(sparse, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    dense = dsd_fx.transform(loaded, phase="dense")
    torch.testing.assert_close(dense(x), sparse(x))
    assert dense.code == torch.fx.symbolic_trace(Tied()).code
    assert dense.get_parameter("a.weight") is dense.get_parameter("b.weight")
