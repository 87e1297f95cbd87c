"""dsd_fx.push.scoring and transform(phase="prune", importance="discriminant"): the utility of the tapped
units (CVIU21 §3's sigma_b^2 / sigma_w^2), traced back through the weights to earlier channel groups."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dsd_fx
from tests.channel_models import InvertedResidual, ResBlock


def _ratio(feats: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sigma_b^2 / (sigma_w^2 + r) per column, written out here; r = 1e-3 * tr(S_t) / d (README: the push's ridge)."""
    feats, mu = feats.double(), feats.double().mean(0)
    between, within = torch.zeros(feats.shape[1], dtype=torch.float64), torch.zeros(feats.shape[1], dtype=torch.float64)
    for c in y.unique():
        rows = feats[y == c]
        between += len(rows) * (rows.mean(0) - mu) ** 2
        within += ((rows - rows.mean(0)) ** 2).sum(0)
    ridge = 1e-3 * (between + within).sum() / feats.shape[1]
    return (between / (within + ridge)).float()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


def _two_class_data(n: int = 400, d: int = 8, informative=(2, 5), shift: float = 3.0, seed: int = 0):
    """Positive features (relu passes them); only the `informative` columns move with the class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + 6
    for j in informative:
        x[:, j] += shift * y
    return x, y


class MLP(nn.Module):
    def __init__(self, widths) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


def _identity(layer: nn.Linear, scale=None) -> None:
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
        for j in range(layer.out_features):
            layer.weight[j, j] = 1.0 if scale is None else scale[j]


def test_utility_ranks_the_informative_units_of_the_last_hidden_layer_highest():
    x, y = _two_class_data()
    model = MLP([8, 8, 2])
    _identity(model.layers[0])  # the last hidden layer's units are the features themselves
    scores = dsd_fx.importance(model, [(x[:200], y[:200]), (x[200:], y[200:])])
    assert list(scores) == ["layers.0"]
    s = scores["layers.0"]
    assert set(torch.topk(s, 2).indices.tolist()) == {2, 5}
    expected = _ratio(x, y)
    torch.testing.assert_close(s, expected / expected.max(), rtol=1e-4, atol=1e-5)


def test_traces_back_through_a_linear_to_the_units_that_feed_the_informative_ones():
    x, y = _two_class_data(informative=(3, 6))
    model = MLP([8, 8, 4, 2])
    _identity(model.layers[0])
    with torch.no_grad():
        w = model.layers[1].weight
        w.zero_()
        model.layers[1].bias.zero_()
        w[0, 3], w[1, 6], w[2, 0], w[3, 1] = 1.0, 2.0, 1.0, 1.0  # hidden units 0, 1 read the informative 3, 6
    scores = dsd_fx.importance(model, DataLoader(TensorDataset(x, y), batch_size=100))
    r = _ratio(torch.stack([x[:, 3], 2 * x[:, 6], x[:, 0], x[:, 1]], 1), y)  # the tapped units
    top = r / r.max()
    torch.testing.assert_close(scores["layers.1"], top, rtol=1e-4, atol=1e-5)
    back = torch.zeros(8)
    back[3], back[6], back[0], back[1] = top[0] * 1, top[1] * 2, top[2], top[3]  # sum_o s_o |W[o, c]|
    torch.testing.assert_close(scores["layers.0"], back / back.max(), rtol=1e-4, atol=1e-5)
    assert set(torch.topk(scores["layers.0"], 2).indices.tolist()) == {3, 6}
    assert scores["layers.0"][[2, 4, 5, 7]].eq(0).all()


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.fc = nn.Linear(3 * 2 * 2, 2)

    def features(self, x):
        h = F.relu(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return torch.flatten(F.adaptive_avg_pool2d(h, 2), 1)

    def forward(self, x):
        return self.fc(self.features(x))


def test_traces_back_through_a_conv_a_batchnorm_and_a_flatten_block():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (300,), generator=g)
    x = torch.randn(300, 4, 6, 6, generator=g) + 4
    x[:, 0] += 2 * y[:, None, None]
    x[:, 2] += 2 * y[:, None, None]
    model = SmallCNN().eval()
    with torch.no_grad():
        model.conv1.weight.copy_(torch.eye(4)[:, :, None, None])
        model.conv1.bias.zero_()
        model.bn1.running_var.copy_(torch.tensor([1.0, 4.0, 1.0, 1.0]))
        model.bn1.weight.copy_(torch.tensor([1.0, 1.0, 3.0, 1.0]))
        w = model.conv2.weight
        w.zero_()
        w[0, 2], w[1, 0], w[2, 1] = 1.0, 0.5, 1.0  # every 3x3 position: sum |w| = 9, 4.5, 9
    scores = dsd_fx.importance(model, [(x, y)])
    with torch.no_grad():
        r = _ratio(model.features(x), y)
    seed = r.reshape(3, 4).sum(1)  # a flatten block: one channel is 2*2 features
    seed = seed / seed.max()
    torch.testing.assert_close(scores["conv2"], seed, rtol=1e-4, atol=1e-5)
    gain = torch.tensor([1.0, 1.0, 3.0, 1.0]) / (torch.tensor([1.0, 4.0, 1.0, 1.0]) + 1e-5).sqrt()
    back = torch.tensor([4.5 * seed[1], 9 * seed[2], 9 * seed[0], 0.0]) * gain
    torch.testing.assert_close(scores["conv1"], back / back.max(), rtol=1e-4, atol=1e-5)
    assert set(torch.topk(scores["conv1"], 2).indices.tolist()) == {0, 2}
    assert scores["conv1"][3] == 0


def _prune_problem():
    """Hidden units 3 and 6 decide the class but have small weights; the other six are large and useless."""
    x, y = _two_class_data(n=600, d=8, informative=(3, 6), shift=4.0, seed=2)
    x[:, 6] -= 4.0 * y  # x3 rises with the class, x6 falls: the classifier reads x3 - x6
    x[:, 6] += 4.0 * (1 - y)
    model = MLP([8, 8, 2])
    _identity(model.layers[0], scale=[5.0, 5.0, 5.0, 0.5, 5.0, 5.0, 0.5, 5.0])
    with torch.no_grad():
        fc = model.layers[1]
        fc.weight.fill_(0.01)
        fc.bias.zero_()
        fc.weight[0, 3], fc.weight[0, 6], fc.weight[1, 3], fc.weight[1, 6] = -1.0, 1.0, 1.0, -1.0
    return model, x, y


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_prune_phase_with_discriminant_importance_removes_the_uninformative_channels():
    model, x, y = _prune_problem()
    before = _accuracy(model, x, y)
    assert before > 0.97
    loader = DataLoader(TensorDataset(x, y), batch_size=128)
    pruned = dsd_fx.transform(model, phase="prune", channels=0.75, importance="discriminant", data=loader,
                              example_args=(x[:4],))
    assert torch.equal(pruned.get_submodule("layers.0").weight, model.layers[0].weight[[3, 6]])
    assert _accuracy(pruned, x, y) >= before - 0.005
    l1 = dsd_fx.transform(model, phase="prune", channels=0.75, importance="l1", example_args=(x[:4],))
    assert _accuracy(l1, x, y) < 0.75  # the magnitudes point the other way here: L1 keeps useless units


@pytest.mark.parametrize("make", [ResBlock, InvertedResidual])
def test_residual_models_are_scored_and_pruned(make):
    torch.manual_seed(0)
    model = make().eval()
    x, y = torch.randn(12, 3, 8, 8), torch.arange(12) % 3
    groups = [g for g in dsd_fx.channel_groups(model, (x,)) if g.prunable]
    scores = dsd_fx.importance(model, [(x, y)])
    assert {g.name for g in groups} <= set(scores)
    assert all(scores[g.name].shape == (g.size,) and scores[g.name].max() == 1 for g in groups)
    pruned = dsd_fx.transform(model, phase="prune", channels=0.25, importance="discriminant", data=[(x, y)],
                              example_args=(x,))
    assert pruned(x).shape == model(x).shape


class ConvOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.a(x))).mean((2, 3))


_X, _Y = torch.randn(8, 8), torch.arange(8) % 2


@pytest.mark.parametrize("make, options, error, words", [
    (lambda: MLP([8, 8, 2]), {"example_args": (_X,)}, TypeError, "needs data="),
    (lambda: MLP([8, 8, 2]), {"example_args": (_X,), "importance": "l1", "data": [(_X, _Y)]}, TypeError, "only by importance='discriminant'"),
    (lambda: MLP([8, 8, 2]), {"example_args": (_X,), "data": 3}, TypeError, "iterable of (inputs, labels)"),
    (lambda: MLP([8, 8, 2]), {"example_args": (_X,), "data": [_X]}, ValueError, "batch 0 of data is a Tensor"),
    (lambda: MLP([8, 8, 2]), {"example_args": (_X,), "data": DataLoader(TensorDataset(_X), batch_size=4)}, ValueError, "list of 1"),
    (lambda: MLP([8, 8, 2]), {"example_args": (_X,), "data": [(_X, _Y.float())]}, ValueError, "integer class ids"),
    (ConvOnly, {"example_args": (torch.randn(2, 3, 4, 4),), "data": [(torch.randn(2, 3, 4, 4), _Y[:2])]}, ValueError, "no Linear"),
])
def test_bad_input_raises_before_anything_changes(make, options, error, words):
    model = make()
    before = _state(model)
    options = {"importance": "discriminant", **options}
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        dsd_fx.transform(model, phase="prune", channels=0.5, **options)
    assert _same(model, before)


def test_importance_refuses_bad_arguments_and_leaves_the_model_alone():
    model = MLP([8, 8, 2])
    before = _state(model)
    with pytest.raises(ValueError, match="unknown method 'l1'"):
        dsd_fx.importance(model, [(_X, _Y)], method="l1")
    with pytest.raises(TypeError, match="data is an iterator"):
        dsd_fx.importance(model, iter([(_X, _Y)]))
    with pytest.raises(ValueError, match="yielded no batch"):
        dsd_fx.importance(model, [])
    with pytest.raises(ValueError, match="no Linear"):
        dsd_fx.importance(ConvOnly(), [(torch.randn(2, 3, 4, 4), _Y[:2])])
    assert _same(model, before)
    scores = dsd_fx.importance(model, iter([(_X, _Y)]), example_args=(_X,))  # an iterator with example_args: one pass
    assert scores["layers.0"].shape == (8,)
    assert _same(model, before)


class TwoHeads(nn.Module):
    """An auxiliary head whose hidden layer `b` does not reach the final classifier's input."""

    def __init__(self) -> None:
        super().__init__()
        self.b, self.aux = nn.Linear(8, 5), nn.Linear(5, 2)
        self.a, self.fc = nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x):
        aux = self.aux(F.relu(self.b(x)))
        return self.fc(F.relu(self.a(x))), aux


def test_a_group_that_does_not_reach_the_tap_is_named_and_refused():
    model = TwoHeads()
    before = _state(model)
    assert set(dsd_fx.importance(model, [(_X, _Y)])) == {"a"}
    with pytest.raises(ValueError, match=r"no score for group\(s\) 'b'.*exclude=\['b'\]"):
        dsd_fx.transform(model, phase="prune", channels=0.5, importance="discriminant", data=[(_X, _Y)], example_args=(_X,))
    assert _same(model, before)
    pruned = dsd_fx.transform(model, phase="prune", channels=0.5, importance="discriminant", data=[(_X, _Y)],
                              example_args=(_X,), exclude=["b"])
    assert pruned.get_submodule("a").out_features == 3 and pruned.get_submodule("b").out_features == 5


@pytest.mark.parametrize("taps", [None, ["layers.0"]])
def test_a_pushed_graph_is_pruned_like_its_model_and_its_taps_vanish(taps):
    # Grow-Push-Prune's own order: push, then prune the pushed graph (its taps go, as masks go in re-dense)
    from dsd_fx.taps import recorder_of

    x, y = _two_class_data()
    model = MLP([8, 8, 4, 2])
    pushed = dsd_fx.transform(model, phase="push", taps=taps)
    code = pushed.code
    options = {"channels": 0.5, "importance": "discriminant", "data": [(x, y)], "example_args": (x[:4],)}
    pruned = dsd_fx.transform(pushed, phase="prune", **options)
    plain = dsd_fx.transform(model, phase="prune", **options)
    assert pruned.code == plain.code and "tap" not in pruned.code and recorder_of(pruned) is None
    assert pruned.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(pruned.state_dict()[k], v) for k, v in plain.state_dict().items())
    assert pushed.code == code  # the user's pushed graph keeps its taps and still records
    pushed(x[:4])
    assert len(recorder_of(pushed).activations) == 1


def test_a_pushed_sparse_phase_graph_is_still_refused_as_sparse():
    pushed = dsd_fx.transform(dsd_fx.transform(MLP([8, 8, 2]), sparsity=0.5), phase="push")
    with pytest.raises(ValueError, match="sparse-phase graph .*re-dense it first"):
        dsd_fx.transform(pushed, phase="prune", channels=0.5, importance="l1", example_args=(_X,))
