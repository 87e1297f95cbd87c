"""transform(phase="prune"): smaller layers, the same function where the removed channels were dead."""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from dsd_fx.channels.macs import cost
from dsd_fx.phases import transform
from dsd_fx.infra.pipeline import NOTES
from dsd_fx.prune.config import PruneConfig
from tests.channel_models import Dense, FlatCNN, Functional, Inception, InvertedResidual, MLPBlock, ResBlock, randomize_norms

IMG = torch.randn(2, 3, 8, 8)
BN = ("weight", "bias")


def kill(model: nn.Module, spec: list[tuple[str, int, list[int]]]) -> nn.Module:
    """Zero the slices `spec` names: (tensor path, dim, indices), written by hand per model."""
    with torch.no_grad():
        for path, dim, idx in spec:
            t = model.get_parameter(path)
            t.index_fill_(dim, torch.tensor(idx), 0.0)
    return model


def norm(layer: str, idx: list[int]) -> list[tuple[str, int, list[int]]]:
    return [(f"{layer}.{t}", 0, idx) for t in BN]


def blocks(idx: list[int], repeat: int) -> list[int]:
    return [c * repeat + k for c in idx for k in range(repeat)]


def same_function(model: nn.Module, x, channels) -> torch.fx.GraphModule:
    model.eval()
    with torch.no_grad():
        want = model(x)
    gm = transform(model, phase="prune", channels=channels, example_args=(x,))
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)
    return gm


def test_resnet_dead_channels_removed_with_same_output():
    dead = [1, 5, 9, 14]
    model = kill(randomize_norms(ResBlock()), [("c2.weight", 0, dead), ("c2.bias", 0, dead), ("down.weight", 0, dead),
                 ("down.bias", 0, dead), ("dw.weight", 0, dead), ("dw.bias", 0, dead), ("fc.weight", 1, blocks(dead, 16)),
                 *norm("b2", dead), *norm("bd", dead)])
    gm = same_function(model, IMG, {"c2": 0.25})
    assert gm.c2.weight.shape == (12, 16, 3, 3) and gm.down.weight.shape == (12, 8, 1, 1)
    assert gm.dw.weight.shape == (12, 1, 3, 3) and gm.dw.groups == 12 and gm.dw.in_channels == 12
    assert gm.b2.num_features == 12 and gm.bd.running_var.shape == (12,) and gm.fc.weight.shape == (10, 192)
    assert gm.c1.weight.shape == (16, 8, 3, 3)  # no other group touched
    assert model.c2.weight.shape == (16, 16, 3, 3)  # the user's model is not


def test_mobilenet_inverted_residual_dead_channels():
    hid, stem = [0, 3, 7, 11, 18, 23], [2, 6]
    model = kill(randomize_norms(InvertedResidual()), [
        ("expand.weight", 0, hid), *norm("bn1", hid), ("dw.weight", 0, hid), *norm("bn2", hid), ("project.weight", 1, hid),
        ("stem.weight", 0, stem), ("stem.bias", 0, stem), *norm("bn0", stem), ("project.weight", 0, stem),
        *norm("bn3", stem), ("expand.weight", 1, stem), ("head.weight", 1, stem)])
    gm = same_function(model, IMG, {"expand": 0.25, "stem": 0.25})
    assert gm.expand.weight.shape == (18, 6, 1, 1) and gm.dw.weight.shape == (18, 1, 3, 3) and gm.dw.groups == 18
    assert gm.project.weight.shape == (6, 18, 1, 1) and gm.bn3.num_features == 6 and gm.head.in_features == 6


def test_inception_cat_then_batchnorm_dead_channels():
    a, b = [1, 2], [0, 4, 5]
    model = kill(randomize_norms(Inception()), [
        ("a.weight", 0, a), ("a.bias", 0, a), ("b.weight", 0, b), ("b.bias", 0, b),
        *norm("bn", [1, 2, 4, 8, 9]), ("mix.weight", 1, [1, 2, 4, 8, 9])])
    gm = same_function(model, IMG, {"a": 0.5, "b": 0.5})
    assert gm.a.weight.shape == (2, 8, 1, 1) and gm.b.weight.shape == (3, 8, 3, 3)
    assert gm.bn.num_features == 5 and gm.mix.weight.shape == (6, 5, 1, 1)


def test_densenet_repeated_cat_dead_channels():
    stem, c1 = [2, 5], [0, 3]
    both = [2, 5, 8, 11]
    model = kill(randomize_norms(Dense()), [
        ("stem.weight", 0, stem), ("stem.bias", 0, stem), ("c1.weight", 1, stem), ("c1.weight", 0, c1), ("c1.bias", 0, c1),
        ("c2.weight", 1, both), *norm("bn", both), ("head.weight", 1, both)])
    gm = same_function(model, IMG, {"stem": 0.25, "c1": 0.5})
    assert gm.c1.weight.shape == (2, 6, 3, 3) and gm.c2.weight.shape == (4, 8, 3, 3)
    assert gm.bn.num_features == 12 and gm.head.weight.shape == (6, 12, 1, 1)


def test_transformer_mlp_hidden_dim_dead_channels():
    dead = list(range(0, 64, 4))
    model = kill(MLPBlock(), [("fc1.weight", 0, dead), ("fc1.bias", 0, dead), ("fc2.weight", 1, dead)])
    gm = same_function(model, torch.randn(2, 5, 16), 0.25)
    assert gm.fc1.weight.shape == (48, 16) and gm.fc1.out_features == 48 and gm.fc2.weight.shape == (16, 48)


def test_cnn_flattened_into_linear_dead_channels():
    c2, c1 = [1, 3], [0, 7]
    model = kill(randomize_norms(FlatCNN()), [
        ("conv2.weight", 0, c2), ("conv2.bias", 0, c2), ("fc.weight", 1, blocks(c2, 25)),
        ("conv1.weight", 0, c1), ("conv1.bias", 0, c1), *norm("bn1", c1), ("conv2.weight", 1, c1)])
    gm = same_function(model, torch.randn(2, 3, 5, 5), {"conv2": 0.5, "conv1": 0.25})
    assert gm.fc.weight.shape == (10, 50) and gm.fc.in_features == 50 and gm.conv2.weight.shape == (2, 6, 3, 3)


@settings(max_examples=12, deadline=None)
@given(st.floats(min_value=0.0, max_value=0.99))
def test_every_prunable_group_loses_floor_fraction(fraction):
    gm = transform(ResBlock(), phase="prune", channels=fraction, example_args=(IMG,))
    lose = lambda n: min(math.floor(fraction * n), n - 1)  # noqa: E731
    assert gm.stem.out_channels == 8 - lose(8) and gm.c1.out_channels == 16 - lose(16)
    assert gm.c2.out_channels == gm.down.out_channels == gm.dw.groups == 16 - lose(16)
    assert gm.fc.out_features == 10 and gm(IMG).shape == (2, 10)


def test_global_scope_removes_floor_fraction_of_all_channels():
    gm = transform(ResBlock(), phase="prune", channels=0.5, scope="global", example_args=(IMG,))
    kept = gm.stem.out_channels + gm.c1.out_channels + gm.c2.out_channels
    assert kept == 40 - 20 and min(gm.stem.out_channels, gm.c1.out_channels, gm.c2.out_channels) >= 1


def test_round_to_keeps_a_multiple():
    gm = transform(MLPBlock(), phase="prune", channels=0.3, round_to=8, example_args=(torch.randn(2, 5, 16),))
    assert gm.fc1.out_features == 48  # floor(0.3 * 64) = 19 removed would keep 45: rounded up to 48


def test_callable_importance_and_l2():
    model = MLPBlock()
    gm = transform(model, phase="prune", channels=0.25, importance=lambda g, ex: -torch.arange(g.size, dtype=torch.float),
                   example_args=(torch.randn(2, 5, 16),))
    torch.testing.assert_close(gm.fc1.weight, model.fc1.weight[:48], rtol=0, atol=0)
    torch.testing.assert_close(gm.fc2.weight, model.fc2.weight[:, :48], rtol=0, atol=0)
    with torch.no_grad():
        model.fc1.weight[10:14] *= 1e-3
        model.fc2.weight[:, 10:14] *= 1e-3
    gm = transform(model, phase="prune", channels=4 / 64 + 1e-9, importance="l2", example_args=(torch.randn(2, 5, 16),))
    torch.testing.assert_close(gm.fc1.weight, torch.cat([model.fc1.weight[:10], model.fc1.weight[14:]]), rtol=0, atol=0)


def test_inplace_writes_smaller_layers_into_the_users_model():
    model = ResBlock().eval()
    gm = transform(model, phase="prune", channels={"c2": 0.25}, example_args=(IMG,), inplace=True)
    assert type(model) is ResBlock and model.c2.out_channels == 12 and model.dw.weight.shape == (12, 1, 3, 3)
    assert model.c2.weight is gm.c2.weight and set(model.state_dict()) == set(gm.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(IMG), gm.eval()(IMG))


def test_same_parameter_names_and_text_of_the_change():
    model = ResBlock()
    gm = transform(model, phase="prune", channels={"c2": 0.25}, example_args=(IMG,))
    assert list(gm.state_dict()) == list(model.state_dict())
    text = gm.meta[NOTES]["prune_channels"]
    assert "group 'c2' (c2, down): 16 -> 12 channels" in text
    assert re.search(r"\n  c2\.weight +\(16, 16, 3, 3\) -> \(12, 16, 3, 3\)\n", text)
    assert re.search(r"\n  fc\.weight +\(10, 256\) -> \(10, 192\)", text) and "c1.weight" not in text


class _Lone(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


BAD = [
    (ResBlock, dict(channels=1.0), ValueError, "got 1.0"),
    (ResBlock, dict(channels=-0.1), ValueError, "[0, 1)"),
    (ResBlock, dict(channels={"nomatch*": 0.5}), ValueError, "'nomatch*' matches no layer"),
    (ResBlock, dict(channels={"fc": 0.5}), ValueError, "only groups that cannot be pruned: 'fc'"),
    (ResBlock, dict(exclude="zzz"), ValueError, "exclude pattern 'zzz'"),
    (ResBlock, dict(importance="l3"), ValueError, "'l3'"),
    (ResBlock, dict(importance=lambda g, ex: torch.zeros(3)), ValueError, "gave 3 scores for group 'stem' of 8"),
    (ResBlock, dict(importance=lambda g, ex: torch.full((g.size,), float("nan"))), ValueError,
     "gave 8 NaN or Inf score(s) for group 'stem' of 8 channels (layers stem) (channel 0: nan)"),
    (ResBlock, dict(importance=lambda g, ex: torch.arange(g.size, dtype=torch.float).index_fill(0, torch.tensor([2]), float("inf"))),
     ValueError, "gave 1 NaN or Inf score(s) for group 'stem' of 8 channels (layers stem) (channel 2: inf)"),
    (ResBlock, dict(importance=lambda g, ex: torch.rand(g.size, 1)), ValueError, "gave scores of shape (8, 1) for group 'stem'"),
    (ResBlock, dict(importance=lambda g, ex: [1.0] * g.size), TypeError, "returned a list for group 'stem'"),
    (ResBlock, dict(importance=lambda g, ex: torch.arange(g.size)), TypeError, "returned int64 scores for group 'stem'"),
    (ResBlock, dict(round_to=0), ValueError, "round_to"),
    (ResBlock, dict(sparsity=0.5), TypeError, "phase='prune' does not take sparsity"),
    (_Lone, dict(), ValueError, "no channel group of _Lone can be pruned"),
]


@pytest.mark.parametrize("make, options, error, words", BAD, ids=[w for *_, w in BAD])
def test_bad_input_raises_before_anything_changes(make, options, error, words):
    model = make()
    x = torch.randn(2, 4) if make is _Lone else IMG
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error) as info:
        transform(model, phase="prune", example_args=(x,), **options)
    assert words in str(info.value)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("where", ["stem.weight", "c1.bias", "b1.weight"])
def test_a_nan_or_inf_weight_is_refused_before_anything_changes(where):
    # as the sparse phase refuses it: a NaN cannot be ranked, and pruning around it hands back a NaN model
    model = ResBlock()
    with torch.no_grad():
        model.get_parameter(where).view(-1)[1] = float("nan") if where != "c1.bias" else float("inf")
    before = copy.deepcopy(model.state_dict())
    for importance in ("l1", lambda g, ex: torch.rand(g.size)):
        with pytest.raises(ValueError, match=rf"'{re.escape(where)}' holds NaN or Inf \(channel group '\w+'\).*exclude="):
            transform(model, phase="prune", channels=0.25, importance=importance, example_args=(IMG,))
    after = model.state_dict()
    assert all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)


def test_missing_example_args():
    model = ResBlock()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="needs example_args"):
        transform(model, phase="prune", channels=0.25)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_config_is_frozen_and_validates():
    cfg = PruneConfig(channels=0.5, example_args=IMG)
    assert cfg.example_args == (IMG,)
    with pytest.raises(Exception):
        cfg.channels = 0.1
    with pytest.raises(ValueError, match="scope='global'"):
        PruneConfig(channels={"a": 0.5}, scope="global", example_args=IMG)


class _Odd(nn.Module):
    """Embedding, ConvTranspose and an InstanceNorm without affine params or stats."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 8), nn.Linear(8, 3)
        self.up, self.inorm, self.up2 = nn.ConvTranspose2d(3, 8, 2, stride=2), nn.InstanceNorm2d(8), nn.ConvTranspose2d(8, 2, 1)

    def forward(self, ids, img):
        return self.fc(self.emb(ids).mean(1)).sum() + self.up2(torch.relu(self.inorm(self.up(img)))).sum()


def test_embedding_conv_transpose_and_instance_norm_sizes():
    ids = torch.randint(0, 10, (2, 5))
    gm = transform(_Odd(), phase="prune", channels=0.25, example_args=(ids, IMG))
    assert gm.emb.weight.shape == (10, 6) and gm.emb.embedding_dim == 6 and gm.fc.in_features == 6
    assert gm.up.weight.shape == (3, 6, 2, 2) and gm.up.out_channels == 6 and gm.up.bias.shape == (6,)
    assert gm.inorm.num_features == 6 and gm.up2.weight.shape == (6, 2, 1, 1) and gm.up2.in_channels == 6
    assert gm(ids, IMG).shape == ()


def test_tied_weights_are_refused_before_anything_changes():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
            self.b2 = nn.Linear(8, 8)
            self.b2.weight = self.b.weight

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.c(self.b(h)) + self.c(self.b2(h))

    model = Tied()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="tied weights"):
        transform(model, phase="prune", channels=0.25, example_args=(torch.randn(2, 4),))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_print_changed_shows_the_groups_and_shapes(capsys):
    transform(ResBlock(), phase="prune", channels={"c2": 0.25}, example_args=(IMG,), print_changed="diff")
    err = capsys.readouterr().err
    assert "*** prune_channels (prune phase) ***" in err
    assert "group 'c2' (c2, down): 16 -> 12 channels" in err and re.search(r"dw\.weight +\(16, 1, 3, 3\) -> \(12, 1, 3, 3\)", err)


ZOO = [(ResBlock, (2, 3, 8, 8)), (InvertedResidual, (2, 3, 8, 8)), (Inception, (2, 3, 8, 8)), (Dense, (2, 3, 8, 8)),
       (FlatCNN, (2, 3, 5, 5)), (MLPBlock, (2, 5, 16))]


def _sizes_agree(m: nn.Module) -> None:
    """Every layer's size attributes say what its tensors hold."""
    for name, layer in m.named_modules():
        if isinstance(layer, nn.Linear):
            assert layer.weight.shape == (layer.out_features, layer.in_features), name
        elif isinstance(layer, nn.Conv2d):
            assert layer.weight.shape[:2] == (layer.out_channels, layer.in_channels // layer.groups), name
        elif isinstance(layer, nn.BatchNorm2d):
            assert layer.weight.shape == layer.running_mean.shape == (layer.num_features,), name


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(ZOO), st.floats(min_value=0.0, max_value=0.99), st.sampled_from(["layer", "global"]))
def test_any_fraction_of_any_zoo_model_gives_a_consistent_smaller_model(entry, fraction, scope):
    make, shape = entry
    model, x = make().eval(), torch.randn(*shape)
    gm = transform(model, phase="prune", channels=fraction, scope=scope, example_args=(x,))
    _sizes_agree(gm)
    with torch.no_grad():
        assert gm.eval()(x).shape == model(x).shape
    assert cost(gm, x).params <= cost(model, x).params


def test_include_limits_pruning_to_the_named_groups_and_zero_changes_nothing():
    gm = transform(ResBlock(), phase="prune", channels=0.5, include="c1", example_args=(IMG,))
    assert gm.c1.out_channels == 8 and gm.stem.out_channels == 8 and gm.c2.out_channels == 16
    model = ResBlock()
    gm = transform(model, phase="prune", channels=0.0, example_args=(IMG,))
    assert all(p is q for p, q in zip(gm.parameters(), model.parameters()))
    assert not gm.meta["dsd_fx"]["changes"][0].modified


def test_example_args_the_model_cannot_run_are_refused(capsys):
    model = ResBlock()
    before = copy.deepcopy(model.state_dict())
    capsys.readouterr()
    with pytest.raises(ValueError, match=r"does not run on example_args \[\(2, 5, 8, 8\)\] \(at node 'stem'\): "
                                         r"RuntimeError: .*expected input\[2, 5, 8, 8\] to have 3 channels"):
        transform(model, phase="prune", channels=0.25, example_args=(torch.randn(2, 5, 8, 8),))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err and not printed.out  # the one error says it all: no traceback before it


def test_functional_weights_shrink_in_place_of_their_get_attr():
    model, args = Functional(), (torch.randn(2, 8), IMG)
    gm = transform(model, phase="prune", channels=0.25, example_args=args)
    assert gm.w1.shape == (12, 8) and gm.b1.shape == (12,) and gm.w2.shape == (12, 9) and gm.bias2.shape == (9,)
    assert gm.w3.shape == (9, 6) and gm.k.shape == (3, 3, 3, 3) and gm.head.weight.shape == (6, 3)
    assert gm(*args).shape == (2, 6) and model.w1.shape == (16, 8)


def test_a_sparse_phase_graph_is_refused():
    sparse = transform(MLPBlock(), phase="sparse", sparsity=0.5)
    with pytest.raises(ValueError, match="re-dense it first"):
        transform(sparse, phase="prune", channels=0.25, example_args=(torch.randn(2, 5, 16),))
