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
from dsd_fx.grow.config import GrowConfig
from dsd_fx.phases import transform
from tests.channel_models import FlatCNN, Functional, Inception, ResBlock, randomize_norms

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
    ({"at": ["conv1"], "width": 3, "how": "inception"}, ValueError, r"4 branches.*width=3 gives 3 channel\(s\) for 'conv1'.*at least 4 channels"),
    ({"at": ["conv1"], "width": 4, "how": "inception", "inplace": True}, ValueError, r"inception.*cannot be written into the model"),
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


@pytest.mark.parametrize("where, how, words", [
    ("conv1.weight", "zeros", r"'conv1.weight' holds NaN or Inf; growing it"),
    ("conv2.weight", "net2net", r"'conv2.weight' holds NaN or Inf; growing it"),  # a consumer of the grown group
    # inception edits no tensor of conv1 (branches go beside it): the outputs' check names it
    ("conv1.weight", "inception", r"hold NaN or Inf before growing \(weight\(s\) 'conv1.weight'"),
    ("head.bias", "zeros", r"outputs on example_args hold NaN or Inf before growing \(weight\(s\) 'head.bias'"),
], ids=["producer", "consumer", "inception", "elsewhere"])
def test_a_nan_weight_is_the_users_value_error_before_anything_changes(where, how, words):
    # the user's weight is the cause: a ValueError before any work, not the invariant's PassError after it
    model, x = _fresh("cnn_bn")
    with torch.no_grad():
        model.get_parameter(where).view(-1)[0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=words):
        transform(model, phase="grow", at=["conv1"], width=4, how=how, example_args=(x,))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k].nan_to_num(), v.nan_to_num()) for k, v in after.items())


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


# ---------------------------------------------------------------- Inception growth


class Conv1dNet(nn.Module):
    """The MNIST-1D CNN's shape: stride-2 Conv1d layers, BN, flatten into the head; conv1 does not
    keep the grid of a 1x1 stride-2 conv (kernel 5, padding 1: 40 -> 19, not 20)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, 8, 5, stride=2, padding=1)
        self.conv2, self.bn2 = nn.Conv1d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm1d(8)
        self.conv3 = nn.Conv1d(8, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6 * 5, 4)

    def forward(self, x):  # (B, 1, 40)
        h = F.relu(self.conv3(F.relu(self.bn2(self.conv2(F.relu(self.conv1(x)))))))
        return self.head(h.flatten(1))


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).mean((2, 3, 4)))


# model, input, layers grown into Inception modules (by 8 channels each: 2 a branch), {path: (dim, before, after)}
INCEPTION_CASES = {
    "conv1d": (Conv1dNet, torch.randn(3, 1, 40), ["conv2", "conv3"],
               {"bn2.weight": (0, 8, 16), "conv3.weight": (1, 8, 16), "head.weight": (1, 30, 70)}),  # 5 features a channel
    "cnn_bn": (BNCNN, IMG, ["conv1"], {"bn1.running_var": (0, 8, 16), "conv2.weight": (1, 8, 16)}),
    "resnet": (ResBlock, IMG, ["c1", "c2"], {"b1.weight": (0, 16, 24), "down.weight": (0, 16, 24),  # c2 + down: one group
                                             "dw.weight": (0, 16, 24), "fc.weight": (1, 256, 384)}),
    "cat": (Inception, IMG, ["b", "stem"], {"bn.weight": (0, 10, 18), "mix.weight": (1, 10, 18), "a.weight": (1, 8, 16)}),
    "flatten": (FlatCNN, SMALL, ["conv2"], {"fc.weight": (1, 100, 300)}),
    "conv3d": (Conv3dNet, torch.randn(2, 2, 4, 4, 4), ["conv"], {"bn.weight": (0, 4, 12), "head.weight": (1, 4, 12)}),
}


def _inception(name: str):
    make, x, at, _ = INCEPTION_CASES[name]
    torch.manual_seed(0)
    model = randomize_norms(make()).eval()
    return model, x, transform(model, phase="grow", at=at, width=8, how="inception", example_args=(x,))


@pytest.mark.parametrize("name", list(INCEPTION_CASES))
def test_inception_growth_preserves_the_function(name):
    model, x, gm = _inception(name)
    torch.testing.assert_close(_out(gm, x), _out(model, x))
    state, mine = gm.state_dict(), model.state_dict()
    for path, (dim, size, grown) in INCEPTION_CASES[name][3].items():
        assert (mine[path].shape[dim], state[path].shape[dim]) == (size, grown), path
    for layer in INCEPTION_CASES[name][2]:  # the grown layer is one branch: its own outputs stay as they were
        mine, grown = model.get_submodule(layer).weight, gm.get_submodule(layer).weight
        assert grown.shape[0] == mine.shape[0] and torch.equal(grown[:, :mine.shape[1]], mine)
        branches = gm.get_submodule(f"{layer}_inception")
        assert [sum(1 for _ in b.parameters()) > 0 for b in branches.values()] == [True] * 4
        assert sorted(branches) == ["branch1x1", "branch3x3", "branch3x3dbl", "branch_pool"]


def test_inception_branches_are_the_basic_module_beside_the_layer():
    model, x, gm = _inception("cnn_bn")
    b = gm.conv1_inception
    kinds = {name: [(type(m).__name__, getattr(m, "kernel_size", None)) for m in seq] for name, seq in b.items()}
    assert kinds == {"branch1x1": [("Conv2d", (1, 1))],
                     "branch3x3": [("Conv2d", (1, 1)), ("ReLU", None), ("Conv2d", (3, 3))],
                     "branch3x3dbl": [("Conv2d", (1, 1)), ("ReLU", None), ("Conv2d", (3, 3)), ("ReLU", None), ("Conv2d", (3, 3))],
                     "branch_pool": [("MaxPool2d", 3), ("Conv2d", (1, 1))]}
    assert [seq[-1].out_channels for seq in b.values()] == [2, 2, 2, 2] and b.branch1x1[0].in_channels == 3
    cat = [n for n in gm.graph.nodes if n.target is torch.cat]
    assert len(cat) == 1 and cat[0].args[0][0].target == "conv1" and [u.name for u in cat[0].users] == ["bn1"]
    assert {dsd_fx.tags.tag_of(n)["role"] for n in gm.graph.nodes if n.name.startswith("conv1_inception")} == {dsd_fx.tags.Role.GROWN}
    assert torch.equal(gm.bn1.weight[8:], torch.ones(8)) and torch.equal(gm.conv2.weight[:, 8:], torch.zeros(6, 8, 3, 3))
    assert gm.bn1.num_features == 16 and gm.conv2.in_channels == 16 and gm.conv1.out_channels == 8


def test_inception_width_is_split_over_the_branches_and_growing_twice_adds_a_second_module():
    model, x = _fresh("cnn_bn")
    gm = transform(model, phase="grow", at="conv1", width=0.75, how="inception", example_args=(x,))  # ceil(6): 2, 2, 1, 1
    assert [seq[-1].out_channels for seq in gm.conv1_inception.values()] == [2, 2, 1, 1]
    again = transform(gm, phase="grow", at="conv1", width=4, how="inception", example_args=(x,))
    assert again.conv1_inception_2.branch1x1[0].out_channels == 1 and again.bn1.num_features == 18
    torch.testing.assert_close(_out(again, x), _out(model, x))


def test_the_inception_grown_model_trains_and_the_branches_learn():
    model, x, gm = _inception("flatten")
    gm.train()
    rows, cols = gm.conv2_inception.branch3x3[2].weight.detach().clone(), gm.fc.weight[:, 100:].detach().clone()
    assert torch.isfinite(_step(gm, x)) and not torch.equal(gm.fc.weight[:, 100:], cols)
    assert torch.equal(gm.conv2_inception.branch3x3[2].weight, rows)  # zero columns: no gradient yet
    assert torch.isfinite(_step(gm, x)) and not torch.equal(gm.conv2_inception.branch3x3[2].weight, rows)


def test_an_inception_grown_graph_is_a_plain_model_to_every_other_phase(tmp_path):
    """The grown nodes are permanent: prune sees their channels, DSD's sparse/dense round trip
    keeps them (code and tags), export writes them as ordinary Conv and Concat ops."""
    model, x, gm = _inception("conv1d")
    assert not dsd_fx.tags.has_dsd_nodes(gm.graph)
    with pytest.raises(ValueError, match="no dsd_fx nodes, so there is nothing to re-dense"):
        transform(gm, phase="dense")
    groups = {g.name: g for g in dsd_fx.channel_groups(gm, (x,))}
    assert groups["conv2_inception.branch3x3.0"].prunable and groups["conv2"].size == 8  # the layer's own channels
    pruned = transform(gm, phase="prune", channels=0.5, example_args=(x,))
    assert pruned.conv2_inception.branch3x3[0].out_channels == 1 and pruned.bn2.num_features < 16
    back = transform(transform(gm, phase="sparse", sparsity=0.5), phase="dense")
    assert back.code == gm.code and sum(1 for n in back.graph.nodes if dsd_fx.tags.is_permanent(n)) == 24  # 11 modules and a cat each
    proto = dsd_fx.export_onnx(gm, (x,), tmp_path / "grown.onnx", optimize=False)
    ops = [n.op_type for n in proto.graph.node]
    concats = [n for n in proto.graph.node if n.op_type == "Concat" and len(n.input) == 5]  # the layer and 4 branches
    assert len(concats) == 2 and ops.count("Conv") == 3 + 2 * 7 and ops.count("MaxPool") == 2
    import onnxruntime as ort
    got = ort.InferenceSession(str(tmp_path / "grown.onnx")).run(None, {proto.graph.input[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), _out(model, x), rtol=1e-4, atol=1e-5)


def test_print_changed_shows_the_inception_module_and_the_shapes(capsys):
    model, x = _fresh("cnn_bn")
    transform(model, phase="grow", at=["conv1"], width=4, how="inception", example_args=(x,), print_changed="diff")
    err = capsys.readouterr().err
    assert "grow_inception" in err and "'conv1' grown into an Inception module 'conv1_inception'" in err
    assert re.search(r"conv2\.weight +\(6, 8, 3, 3\) -> \(6, 12, 3, 3\)", err) and "+1 cat" in err


INCEPTION_BAD = [
    (MLP, torch.randn(4, 6), {"at": ["fc1"]}, r"grows a convolution.*'fc1' is a Linear.*how='zeros'"),
    (Conv1dNet, torch.randn(2, 1, 40), {"at": ["conv1"]}, r"'conv1'.*\(40,\) to \(20,\).*\(40,\) to \(19,\).*2 \* padding = dilation \* \(kernel - 1\)"),
    (ResBlock, IMG, {"at": ["c2", "down"]}, r"'c2' and 'down' make one channel group"),
    (ResBlock, IMG, {"at": ["c1", "dw"]}, r"'dw'"),
    (Functional, (torch.randn(2, 8), IMG), {"at": ["k"]}, r"'k' is not a submodule \(a functional convolution's weight\?\)"),
]


@pytest.mark.parametrize("make,x,options,words", INCEPTION_BAD)
def test_inception_bad_input_raises_before_anything_changes(make, x, options, words):
    torch.manual_seed(0)
    model = make()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=words):
        transform(model, phase="grow", how="inception", width=8, example_args=x if isinstance(x, tuple) else (x,), **options)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], v) for k, v in after.items())


class Unbatched(nn.Module):
    """Convolutions on an unbatched (C, H, W) input whose C (3 -> 8 -> 4) is neither H nor W."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # (3, 10, 6)
        return self.head(self.c2(F.relu(self.c1(x))).mean((1, 2)))


@pytest.mark.parametrize("how", ["zeros", "inception"])
def test_unbatched_convolutions_grow_and_prune_their_channels(how):
    torch.manual_seed(0)
    model, x = Unbatched().eval(), torch.randn(3, 10, 6)
    groups = {g.name: g.size for g in dsd_fx.channel_groups(model, (x,))}
    assert groups["c1"] == 8 and groups["c2"] == 4  # channels, not H = 10
    gm = transform(model, phase="grow", at="c1", width=4, how=how, example_args=(x,))
    torch.testing.assert_close(_out(gm, x), _out(model, x))
    assert gm.c2.in_channels == 12
    pruned = transform(model, phase="prune", channels=0.5, example_args=(x,))
    assert pruned.c1.out_channels == 4 and pruned(x).shape == (2,)


def test_inception_growth_holds_for_every_input_size_it_admits():
    """The grid check is the layer's geometry, not example_args' size: a stride-2 kernel-2 conv
    without padding maps 8 to 4 like the 1x1 branches, but 9 to 4 where they make 5: refused."""
    class Net(nn.Module):
        def __init__(self, k: int, p: int) -> None:
            super().__init__()
            self.stem, self.conv = nn.Conv2d(3, 8, k, stride=2, padding=p), nn.Conv2d(8, 4, 3, padding=1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.conv(F.relu(self.stem(x))).mean((2, 3)))

    with pytest.raises(ValueError, match=r"'stem' \(kernel \(2, 2\), padding \(0, 0\).*2 \* padding = dilation \* \(kernel - 1\)"):
        transform(Net(2, 0), phase="grow", at="stem", width=4, how="inception", example_args=(torch.randn(1, 3, 8, 8),))
    model = Net(3, 1).eval()  # 2p = k - 1: every size
    gm = transform(model, phase="grow", at="stem", width=4, how="inception", example_args=(torch.randn(1, 3, 8, 8),))
    for size in (7, 8, 9, 12):
        x = torch.randn(2, 3, size, size)
        torch.testing.assert_close(_out(gm, x), _out(model, x))


class Clash(BNCNN):
    def __init__(self) -> None:
        super().__init__()
        self.conv1_inception = nn.Parameter(torch.zeros(1))  # a parameter with the container's name, used

    def forward(self, x):
        return super().forward(x) + self.conv1_inception


def test_inception_container_names_avoid_any_attribute_of_the_parent():
    model, x = Clash().eval(), IMG
    gm = transform(model, phase="grow", at="conv1", width=4, how="inception", example_args=(x,))
    torch.testing.assert_close(_out(gm, x), _out(model, x))
    assert isinstance(gm.conv1_inception_2, nn.ModuleDict) and "conv1_inception" in dict(gm.named_parameters())


def test_a_sparse_phase_model_made_from_a_grown_one_saves_and_loads(tmp_path):
    model, x, gm = _inception("cnn_bn")
    sparse = transform(gm, phase="sparse", sparsity=0.5)
    torch.save(sparse, tmp_path / "sparse.pt")
    back = torch.load(tmp_path / "sparse.pt", weights_only=False)
    dense = transform(back, phase="dense")
    assert dense.code == gm.code and sum(1 for n in dense.graph.nodes if dsd_fx.tags.is_permanent(n)) == 12
