"""criterion='wanda': masks from |W| * ||X||_2 over calibration batches, against a direct computation."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dsd_fx
from conftest import assert_unchanged, snapshot
from dsd_fx.sparse.wanda import row_mask


class Two(nn.Module):
    def __init__(self, d_in=8, hidden=12, d_out=4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class MatmulHead(nn.Module):
    """x @ W with W (in, out): the rows Wanda compares are W's columns."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))

    def forward(self, x):
        return x @ self.w


def direct_norms(xs: list[torch.Tensor], features: int) -> torch.Tensor:
    """||X_j||_2 over every row of every batch, batch and sequence flattened."""
    rows = torch.cat([x.reshape(-1, features) for x in xs])
    return torch.sqrt((rows.double() ** 2).sum(0)).float()


def direct_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per row, prune the round(sparsity * cols) lowest scores, the lowest index first among ties."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    k = round(sparsity * scores.shape[1])
    for r in range(scores.shape[0]):
        order = sorted(range(scores.shape[1]), key=lambda j: (float(scores[r, j]), j))
        keep[r, order[:k]] = False
    return keep


def calibration(seed=0, shape=(3, 5, 8), scale=None):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(*shape, generator=g) for _ in range(3)]
    if scale is not None:
        xs = [x * scale for x in xs]
    return xs


def test_unstructured_masks_equal_the_direct_computation():
    torch.manual_seed(0)
    model = Two()
    xs = calibration()
    w1, w2 = model.fc1.weight.detach().clone(), model.fc2.weight.detach().clone()
    hidden = [torch.relu(F.linear(x, w1, model.fc1.bias.detach())) for x in xs]
    sparse = dsd_fx.transform(model, phase="sparse", sparsity=0.5, criterion="wanda", data=xs)
    masks = dsd_fx.current_masks(sparse)
    want1 = direct_row_mask(w1.abs() * direct_norms(xs, 8), 0.5)
    want2 = direct_row_mask(w2.abs() * direct_norms(hidden, 12), 0.5)
    assert torch.equal(masks["fc1.weight"], want1)
    assert torch.equal(masks["fc2.weight"], want2)
    assert torch.equal(model.fc1.weight == 0, ~want1)  # the pruned weights are zero now
    assert (~want1).sum(1).eq(4).all()  # half of every output row


def test_wanda_and_magnitude_keep_different_weights():
    """A feature with a large input norm keeps its small weights under Wanda, and loses them under magnitude."""
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.1, 1.0, 0.9, 0.8], [0.2, 0.7, 1.0, 0.6]]))
    scale = torch.tensor([100.0, 1.0, 1.0, 1.0])  # feature 0 carries large activations
    xs = calibration(shape=(6, 4), scale=scale)
    mag = dsd_fx.current_masks(dsd_fx.transform(model, sparsity=0.5, copy=True))["0.weight"]
    wanda = dsd_fx.current_masks(dsd_fx.transform(model, sparsity=0.5, copy=True, criterion="wanda", data=xs))["0.weight"]
    assert not mag[:, 0].any()  # magnitude prunes the small weights of feature 0
    assert wanda[:, 0].all()  # Wanda keeps them: |w| * ||x_0|| is the largest score of each row
    assert torch.equal(wanda, direct_row_mask(model[0].weight.detach().abs() * direct_norms(xs, 4), 0.5))


def test_nm_masks_rank_within_each_group_of_m():
    torch.manual_seed(1)
    model = Two(d_in=8, hidden=8)
    xs = calibration(seed=2, scale=torch.linspace(0.1, 5.0, 8))
    w1 = model.fc1.weight.detach().clone()
    magnitude = dsd_fx.current_masks(dsd_fx.transform(model, pattern="2:4", copy=True))["fc1.weight"]  # same weights
    sparse = dsd_fx.transform(model, pattern="2:4", criterion="wanda", data=xs)
    got = dsd_fx.current_masks(sparse)["fc1.weight"]
    scores = (w1.abs() * direct_norms(xs, 8)).view(8, 2, 4)  # (rows, groups, 4) along the input features
    want = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(8):
        for g in range(2):
            top = sorted(range(4), key=lambda j: (-float(scores[r, g, j]), j))[:2]
            want[r, g, top] = True
    assert torch.equal(got, want.view(8, 8))
    assert not torch.equal(got, magnitude)  # the input norms changed the choice (a fresh Two(8, 8) would differ anyway)


def test_matmul_weight_rows_are_its_columns():
    torch.manual_seed(2)
    model = MatmulHead()
    xs = calibration(shape=(4, 8), scale=torch.arange(1.0, 9.0))
    w = model.w.detach().clone()
    got = dsd_fx.current_masks(dsd_fx.transform(model, sparsity=0.25, criterion="wanda", data=xs))["w"]
    want = direct_row_mask((w.abs() * direct_norms(xs, 8)[:, None]).t(), 0.25).t()
    assert torch.equal(got, want)


@pytest.mark.parametrize("groups,padding,mode", [(1, 1, "zeros"), (2, "same", "zeros"), (1, 1, "reflect"), (2, 0, "zeros")])
def test_conv2d_scores_its_unfolded_input(groups, padding, mode):
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, padding=padding, groups=groups, padding_mode=mode, bias=False)
    model = nn.Sequential(conv)
    xs = calibration(shape=(2, 4, 5, 5), scale=torch.tensor([1.0, 3.0, 0.5, 2.0]).view(4, 1, 1))
    w = conv.weight.detach().clone()
    got = dsd_fx.current_masks(dsd_fx.transform(model, sparsity=0.5, criterion="wanda", data=xs))["0.weight"]
    # the direct way: pad, then sum x^2 over every output position for each kernel offset
    sq = torch.zeros(4, 3, 3, dtype=torch.float64)
    for x in xs:
        pad = 1 if padding in (1, "same") else 0
        xp = F.pad(x, (pad,) * 4, mode="constant" if mode == "zeros" else mode).double()
        out = xp.shape[-1] - 2
        for i in range(3):
            for j in range(3):
                sq[:, i, j] += (xp[:, :, i:i + out, j:j + out] ** 2).sum(dim=(0, 2, 3))
    per_in = sq.sqrt().float().view(groups, 4 // groups, 3, 3)
    norms = per_in.repeat_interleave(6 // groups, dim=0)  # output channel o reads its group's inputs
    want = direct_row_mask((w.abs() * norms).flatten(1), 0.5).view_as(w)
    assert torch.equal(got, want)


def test_conv1d_scores_its_unfolded_input():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1, bias=False))
    xs = calibration(shape=(2, 3, 7), scale=torch.tensor([5.0, 1.0, 0.2]).view(3, 1))
    w = model[0].weight.detach().clone()
    got = dsd_fx.current_masks(dsd_fx.transform(model, sparsity=0.5, criterion="wanda", data=xs))["0.weight"]
    sq = torch.zeros(3, 3, dtype=torch.float64)
    for x in xs:
        xp = F.pad(x, (1, 1)).double()
        for k in range(3):
            sq[:, k] += (xp[:, :, k:k + 7] ** 2).sum(dim=(0, 2))
    want = direct_row_mask((w.abs() * sq.sqrt().float()).flatten(1), 0.5).view_as(w)
    assert torch.equal(got, want)


def test_tuple_batches_and_config_object():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, a, b):
            return self.fc(a + b)

    torch.manual_seed(5)
    model = Pair()
    batches = [(torch.randn(2, 4), torch.randn(2, 4)) for _ in range(2)]
    config = dsd_fx.SparseConfig(sparsity=0.5, criterion="wanda", data=batches)
    got = dsd_fx.current_masks(dsd_fx.transform(model, config=config, copy=True))["fc.weight"]
    want = direct_row_mask(model.fc.weight.detach().abs() * direct_norms([a + b for a, b in batches], 4), 0.5)
    assert torch.equal(got, want)


def test_redense_restores_the_original_graph_after_wanda():
    model = Two()
    sparse = dsd_fx.transform(model, sparsity=0.5, criterion="wanda", data=calibration())
    dense = dsd_fx.transform(sparse, phase="dense")
    assert set(dense.state_dict()) == set(Two().state_dict())


@pytest.mark.parametrize("options,message", [
    ({"criterion": "wanda"}, "needs data="),
    ({"data": [torch.zeros(1, 8)]}, "criterion='wanda'"),
    ({"criterion": "wanda", "data": torch.zeros(2, 8)}, "iterable of calibration batches"),
    ({"criterion": "wanda", "data": [torch.zeros(1, 8)], "pattern": "2:4", "method": "sr-ste", "sparsity": None},
     "recomputes it from magnitudes"),
    ({"criterion": "wanda", "data": [torch.zeros(1, 8)], "scope": "global"}, "within each output row"),
    ({"criterion": "l2"}, "criterion must be one of"),
])
def test_bad_combinations_are_refused_before_any_change(options, message):
    model = Two()
    snap = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=message):
        dsd_fx.transform(model, phase="sparse", **options)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("data,message", [
    ([torch.randn(2, 8), torch.randn(2, 5)], r"calibration batch 1 \(inputs \(2, 5\)\) does not fit"),
    ([], "yielded no calibration batch"),
])
def test_batches_that_do_not_fit_are_refused_before_any_change(data, message):
    model = Two()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        dsd_fx.transform(model, sparsity=0.5, criterion="wanda", data=data)
    assert_unchanged(model, snap)


def test_an_op_without_feature_inputs_is_refused_naming_the_weight():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 4, batch_first=True)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.rnn(x)[0])

    model = Recurrent()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"'rnn.weight_ih_l0' is used by a gru op.*exclude=\['rnn.weight_ih_l0'\]"):
        dsd_fx.transform(model, sparsity=0.5, criterion="wanda", data=[torch.randn(2, 3, 4)])
    assert_unchanged(model, snap)
    sparse = dsd_fx.transform(model, sparsity=0.5, criterion="wanda", data=[torch.randn(2, 3, 4)], exclude=["rnn"])
    assert set(dsd_fx.current_masks(sparse)) == {"fc.weight"}


def test_calibration_leaves_batch_norm_statistics_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    before = model[1].running_mean.clone()
    dsd_fx.transform(model, sparsity=0.5, criterion="wanda", data=[torch.randn(8, 4) + 3])
    assert torch.equal(model[1].running_mean, before) and model.training


def test_row_mask_ties_prune_the_lowest_index():
    keep = row_mask(torch.ones(2, 4), 0.5, 0)
    assert keep.tolist() == [[False, False, True, True]] * 2


def test_exported_llama_scores_the_aten_linear_inputs():
    """transformers 5's LLaMA through torch.export: each projection's mask from the input its module really saw."""
    transformers = pytest.importorskip("transformers", minversion="5")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8,
                                      use_cache=False, tie_word_embeddings=False)
    torch.manual_seed(6)
    model = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(7)
    data = [torch.randint(0, 32, (2, 8), generator=g) for _ in range(2)]
    seen = {}
    hooks = [model.get_submodule(name).register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, []).append(args[0]))
             for name in ("model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj")]
    with torch.no_grad():
        for x in data:
            model(x)
    for h in hooks:
        h.remove()
    sparse = dsd_fx.transform(model, sparsity=0.5, criterion="wanda", data=data, capture="export",
                              example_args=(data[0],), copy=True)
    masks = dsd_fx.current_masks(sparse)
    for name, features in (("model.layers.0.self_attn.k_proj", 16), ("model.layers.0.mlp.down_proj", 32)):
        w = model.get_parameter(f"{name}.weight").detach()
        want = direct_row_mask(w.abs() * direct_norms(seen[name], features), 0.5)
        assert torch.equal(masks[f"{name}.weight"], want), name


def test_dsd_flow_takes_wanda_for_every_sparse_phase():
    """DSD(..., criterion='wanda', data=[...]): each sparse phase (DSDSD too) calibrates on the same list."""
    torch.manual_seed(8)
    model = Two()
    xs = calibration(scale=torch.linspace(0.1, 4.0, 8))
    dsd = dsd_fx.DSD(model, lambda p, lr: torch.optim.SGD(p, lr), lr=0.01, sparsity=0.5, criterion="wanda", data=xs)
    for phase in ("dense", "sparse", "redense", "sparse"):
        w = model.fc1.weight.detach().clone()
        net, _ = dsd.begin(phase)
        if phase == "sparse":
            kept = dsd_fx.current_masks(net)["fc1.weight"]
            assert torch.equal(kept, direct_row_mask(w.abs() * direct_norms(xs, 8), 0.5))
