"""transform(phase="grow"): wider layers that compute what the original did, and then train."""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsd_fx
from dsd_fx.grow_config import GrowConfig
from dsd_fx.phases import transform
from tests.channel_models import FlatCNN, Inception, ResBlock, randomize_norms

IMG, SMALL = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 5, 5)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class BNCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.head(h.mean((2, 3)))


# model, input, layers grown (by 2 channels each), {tensor path: (dim, size before, size after)}
CASES = {
    "mlp": (MLP, torch.randn(4, 6), ["fc1", "fc2"], {"fc1.weight": (0, 16, 18), "fc2.weight": (1, 16, 18),
                                                      "fc3.weight": (1, 12, 14)}),
    "cnn_bn": (BNCNN, IMG, ["conv1"], {"conv1.weight": (0, 8, 10), "bn1.running_var": (0, 8, 10),
                                       "conv2.weight": (1, 8, 10)}),
    "resnet": (ResBlock, IMG, ["c2"], {"c2.weight": (0, 16, 18), "down.weight": (0, 16, 18), "bd.weight": (0, 16, 18),
                                        "dw.weight": (0, 16, 18), "fc.weight": (1, 256, 288)}),  # 16 features a channel
    "cat": (Inception, IMG, ["a", "stem"], {"a.weight": (0, 4, 6), "bn.weight": (0, 10, 12), "mix.weight": (1, 10, 12),
                                             "b.weight": (1, 8, 10)}),
    "flatten": (FlatCNN, SMALL, ["conv2"], {"conv2.weight": (0, 4, 6), "fc.weight": (1, 100, 150)}),  # 25 a channel
}


def _fresh(name: str) -> tuple[nn.Module, torch.Tensor]:
    make, x, _, _ = CASES[name]
    torch.manual_seed(0)
    return randomize_norms(make()).eval(), x


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("how", ["zeros", "net2net"])
@pytest.mark.parametrize("name", list(CASES))
def test_growing_preserves_the_function(name, how):
    model, x = _fresh(name)
    _, _, at, widened = CASES[name]
    want = _out(model, x)
    gm = transform(model, phase="grow", at=at, width=2, how=how, example_args=(x,))
    torch.testing.assert_close(_out(gm, x), want)
    state, mine = gm.state_dict(), model.state_dict()
    for path, (dim, size, grown) in widened.items():
        assert (mine[path].shape[dim], state[path].shape[dim]) == (size, grown), path  # the user's model untouched


def test_zeros_init_is_the_layers_scale_identity_norms_and_zero_columns():
    model, x = _fresh("cnn_bn")
    gm = transform(model, phase="grow", at=["conv1"], width=0.5, example_args=(x,))  # ceil(0.5 * 8) = 4
    new = gm.conv1.weight[8:]
    assert new.shape == (4, 3, 3, 3) and 0 < new.abs().max() <= 1 / math.sqrt(27) and new.std() > 0.05
    assert torch.equal(gm.conv1.weight[:8], model.conv1.weight) and torch.equal(gm.conv1.bias[8:], torch.zeros(4))
    assert torch.equal(gm.bn1.weight[8:], torch.ones(4)) and torch.equal(gm.bn1.bias[8:], torch.zeros(4))
    assert torch.equal(gm.bn1.running_mean[8:], torch.zeros(4)) and torch.equal(gm.bn1.running_var[8:], torch.ones(4))
    assert torch.equal(gm.conv2.weight[:, 8:], torch.zeros(6, 4, 3, 3)) and gm.bn1.num_features == 12
    assert gm.conv1.out_channels == 12 and gm.conv2.in_channels == 12


def test_net2net_copies_the_largest_l1_channels_and_halves_their_columns():
    model, x = _fresh("cnn_bn")
    gm = transform(model, phase="grow", at=["conv1"], width=3, how="net2net", example_args=(x,))
    l1 = (model.conv1.weight.abs().sum((1, 2, 3)) + model.conv1.bias.abs() + model.bn1.weight.abs()
          + model.bn1.bias.abs() + model.conv2.weight.abs().sum((0, 2, 3))).detach()
    src = torch.argsort(-l1, stable=True)[:3]
    assert torch.equal(gm.conv1.weight[8:], model.conv1.weight[src]) and torch.equal(gm.bn1.running_var[8:], model.bn1.running_var[src])
    half = model.conv2.weight[:, src] / 2
    assert torch.equal(gm.conv2.weight[:, src], half) and torch.equal(gm.conv2.weight[:, 8:], half)


def _step(gm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    loss = F.cross_entropy(gm(x), torch.tensor([1, 7]))
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


@pytest.mark.parametrize("how", ["zeros", "net2net"])
def test_the_grown_model_trains(how):
    """zeros: the first step moves the consumers' zero columns (their inputs are the new channels'
    non-zero activations); the producers' new rows get gradient through those columns from the
    second step on. net2net: the copies move at once."""
    model, x = _fresh("flatten")
    gm = transform(model, phase="grow", at=["conv1"], width=2, how=how, example_args=(x,)).train()
    rows, cols = gm.conv1.weight[8:].detach().clone(), gm.conv2.weight[:, 8:].detach().clone()
    assert torch.isfinite(_step(gm, x))
    assert not torch.equal(gm.conv2.weight[:, 8:], cols)
    assert torch.equal(gm.conv1.weight[8:], rows) == (how == "zeros")
    assert torch.isfinite(_step(gm, x)) and not torch.equal(gm.conv1.weight[8:], rows)


def test_growing_then_pruning_zeroed_producers_gives_back_the_original():
    model, x = _fresh("cnn_bn")
    gm = transform(model, phase="grow", at=["conv1"], width=2, example_args=(x,))
    with torch.no_grad():
        gm.conv1.weight[8:] = 0  # zero-initialised producers: the new channels weigh |bn1.weight| = 1 each
    back = transform(gm, phase="prune", channels={"conv1": 0.2}, importance="l1", example_args=(x,))  # floor(0.2 * 10) = 2
    got, want = back.state_dict(), model.state_dict()
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in want.items()}
    assert all(torch.equal(got[k], want[k]) for k in want if k.startswith(("conv", "bn1")))


BAD = [
    ({"at": ["nope"], "width": 2}, ValueError, r"'nope'.*makes no channel group.*conv1"),
    ({"at": ["conv1"], "width": 0}, ValueError, r"width must be a positive.*got 0"),
    ({"at": ["conv1"], "width": -1}, ValueError, r"width must be a positive.*got -1"),
    ({"at": ["head"], "width": 2}, ValueError, r"group of 'head' cannot grow: node 'output'.*model's output"),
    ({"at": ["conv1"], "width": 2, "example_args": None}, TypeError, r"needs example_args"),
    ({"at": ["conv1"], "width": 9, "how": "net2net"}, ValueError, r"asks 9 of the 8 channels of 'conv1'"),
    ({"at": ["conv1"], "width": 3, "how": "inception"}, ValueError, r"how='inception' is refused for 'conv1'"),
    ({"at": [], "width": 2}, TypeError, r"at must be a layer name"),
]


@pytest.mark.parametrize("options,error,words", BAD)
def test_bad_input_raises_before_anything_changes(options, error, words):
    model, x = _fresh("cnn_bn")
    before = copy.deepcopy(model.state_dict())
    options = {"example_args": (x,), **options}
    with pytest.raises(error, match=words):
        transform(model, phase="grow", **options)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], v) for k, v in after.items())


def test_config_object_and_inplace_write_the_wider_layers_into_the_model():
    model, x = _fresh("resnet")
    want = _out(model, x)
    gm = transform(model, phase="grow", config=GrowConfig(at="c1", width=4, example_args=x, inplace=True))
    assert model.c1.weight is gm.c1.weight and model.c1.weight.shape == (20, 8, 3, 3)
    assert model.b1.num_features == 20 and model.c2.in_channels == 20
    torch.testing.assert_close(_out(model, x), want)


def test_print_changed_shows_the_groups_and_shapes(capsys):
    model, x = _fresh("resnet")
    transform(model, phase="grow", at=["c2"], width=2, example_args=(x,), print_changed="diff")
    err = capsys.readouterr().err
    assert "grow_channels" in err and "group 'c2' (c2, down): 16 -> 18 channels" in err
    assert re.search(r"dw\.weight +\(16, 1, 3, 3\) -> \(18, 1, 3, 3\)", err)


def test_a_grown_model_exports_to_onnx(tmp_path):
    model, x = _fresh("resnet")
    gm = transform(model, phase="grow", at=["c2", "stem"], width=2, how="net2net", example_args=(x,))
    proto = dsd_fx.export_onnx(gm, (x,), tmp_path / "grown.onnx", optimize=False)
    shapes = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    assert (tmp_path / "grown.onnx").exists() and (18, 1, 3, 3) in shapes.values()
