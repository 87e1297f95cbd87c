"""find_prunable: one WeightUse per use of a parameter by an op of the table, with its reduction dim."""
import torch.nn as nn

from conftest import Functional, TinyCNN
from dsd_fx.infra.graph_capture import capture
from dsd_fx.sparse.prunable import find_prunable


def test_every_functional_use_is_found_with_its_reduction_dim():
    gm = capture(Functional())
    found = {w.name: sorted((u.kind, u.reduction_dim) for u in w.uses) for w in find_prunable(gm)}
    # written from the model's forward: F.linear(x, w1) (16, 8) contracts dim 1; addmm(bias2, h, w2): w2 (16, 12)
    # is mat2, contracted on dim 0; matmul(h, w3) and h @ w4 on dim 0; conv2d's k on its input channels, dim 1
    assert found["w1"] == [("linear", 1)]
    assert found["w2"] == [("addmm", 0)]
    assert found["w3"] == [("matmul", 0)]
    assert found["w4"] == [("matmul", 0)]
    assert found["k"] == [("conv2d", 1)]
    assert "b1" not in found and "bias2" not in found  # 1-D parameters never


def test_layers_and_their_kinds():
    gm = capture(TinyCNN())
    kinds = {w.name: [u.kind for u in w.uses] for w in find_prunable(gm)}
    assert kinds == {
        "conv1.weight": ["conv2d"], "conv2.weight": ["conv2d"], "up.weight": ["conv_transpose2d"],
        "c1d.weight": ["conv1d"], "t1d.weight": ["conv_transpose1d"], "c3d.weight": ["conv3d"],
        "t3d.weight": ["conv_transpose3d"], "head.weight": ["linear"],
    }


def test_a_parameter_used_twice_is_one_weight_with_two_uses():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    (w,) = find_prunable(capture(Twice()))
    assert w.name == "fc.weight" and len(w.uses) == 2 and len(w.modules) == 2
