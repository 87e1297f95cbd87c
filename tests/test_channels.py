"""channel_groups: the coupled channels of each structure, against hand-written expectations."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from dsd_fx.channels.groups import channel_groups
from tests.channel_models import Dense, FlatCNN, Functional, Inception, InvertedResidual, MLPBlock, ResBlock

IMG = torch.randn(2, 3, 8, 8)


def by_producer(groups):
    return {g.name: g for g in groups}


def slots(group) -> set[tuple]:
    """(layer, tensor, dim, offset, repeat) of every member, the way the expectations are written."""
    return {(m.layer, m.tensor, m.dim, m.offset, m.repeat) for m in group.members}


BN = lambda name, offset=0: {(name, t, 0, offset, 1) for t in ("weight", "bias", "running_mean", "running_var")}  # noqa: E731


def test_mlp_hidden_group_and_blocked_classifier():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    g = by_producer(channel_groups(MLP(), torch.randn(2, 8)))
    assert set(g) == {"fc1", "fc2"}
    assert g["fc1"].size == 16 and g["fc1"].prunable
    assert slots(g["fc1"]) == {("fc1", "weight", 0, 0, 1), ("fc1", "bias", 0, 0, 1), ("fc2", "weight", 1, 0, 1)}
    assert not g["fc2"].prunable and "output" in g["fc2"].blocked_by[0]


def test_resnet_residual_ties_main_and_downsample_branch():
    g = by_producer(channel_groups(ResBlock(), IMG))
    assert set(g) == {"stem", "c1", "c2", "fc"}
    assert g["c2"].producers == ("c2", "down")
    assert g["c2"].size == 16 and g["c2"].prunable
    want = {("c2", "weight", 0, 0, 1), ("c2", "bias", 0, 0, 1), ("down", "weight", 0, 0, 1), ("down", "bias", 0, 0, 1),
            ("dw", "weight", 0, 0, 1), ("dw", "bias", 0, 0, 1), ("fc", "weight", 1, 0, 16)} | BN("b2") | BN("bd")
    assert slots(g["c2"]) == want
    assert slots(g["stem"]) == {("stem", "weight", 0, 0, 1), ("stem", "bias", 0, 0, 1), ("c1", "weight", 1, 0, 1),
                                ("down", "weight", 1, 0, 1)} | BN("bn0")


def test_mobilenet_depthwise_ties_in_and_out_and_residual_ties_stem_to_project():
    g = by_producer(channel_groups(InvertedResidual(), IMG))
    assert slots(g["expand"]) == {("expand", "weight", 0, 0, 1), ("dw", "weight", 0, 0, 1),
                                  ("project", "weight", 1, 0, 1)} | BN("bn1") | BN("bn2")
    assert g["stem"].producers == ("stem", "project") and g["stem"].prunable
    assert slots(g["stem"]) == {("stem", "weight", 0, 0, 1), ("stem", "bias", 0, 0, 1), ("expand", "weight", 1, 0, 1),
                                ("project", "weight", 0, 0, 1), ("head", "weight", 1, 0, 1)} | BN("bn0") | BN("bn3")


def test_inception_concat_offsets_into_the_batchnorm_and_the_next_conv():
    g = by_producer(channel_groups(Inception(), IMG))
    assert slots(g["a"]) == {("a", "weight", 0, 0, 1), ("a", "bias", 0, 0, 1), ("mix", "weight", 1, 0, 1)} | BN("bn", 0)
    assert slots(g["b"]) == {("b", "weight", 0, 0, 1), ("b", "bias", 0, 0, 1), ("mix", "weight", 1, 4, 1)} | BN("bn", 4)
    assert g["a"].size == 4 and g["b"].size == 6 and g["a"].prunable and g["b"].prunable


def test_densenet_repeated_concat():
    g = by_producer(channel_groups(Dense(), IMG))
    assert slots(g["stem"]) == {("stem", "weight", 0, 0, 1), ("stem", "bias", 0, 0, 1), ("c1", "weight", 1, 0, 1),
                                ("c2", "weight", 1, 0, 1), ("head", "weight", 1, 0, 1)} | BN("bn", 0)
    assert slots(g["c1"]) == {("c1", "weight", 0, 0, 1), ("c1", "bias", 0, 0, 1), ("c2", "weight", 1, 8, 1),
                              ("head", "weight", 1, 8, 1)} | BN("bn", 8)
    assert slots(g["c2"]) == {("c2", "weight", 0, 0, 1), ("c2", "bias", 0, 0, 1), ("head", "weight", 1, 12, 1)} | BN("bn", 12)
    assert all(g[k].prunable for k in ("stem", "c1", "c2", "head"))


def test_transformer_mlp_hidden_dim_prunable_residual_stream_not():
    g = by_producer(channel_groups(MLPBlock(), torch.randn(2, 5, 16)))
    assert slots(g["fc1"]) == {("fc1", "weight", 0, 0, 1), ("fc1", "bias", 0, 0, 1), ("fc2", "weight", 1, 0, 1)}
    assert g["fc1"].prunable and g["fc1"].size == 64
    assert not g["fc2"].prunable
    assert any("operand 'x' carries 16 channels" in r for r in g["fc2"].blocked_by)


def test_flatten_into_linear_repeats_each_channel_hw_times():
    g = by_producer(channel_groups(FlatCNN(), torch.randn(2, 3, 5, 5)))
    assert slots(g["conv2"]) == {("conv2", "weight", 0, 0, 1), ("conv2", "bias", 0, 0, 1), ("fc", "weight", 1, 0, 25)}
    assert slots(g["conv1"]) == {("conv1", "weight", 0, 0, 1), ("conv1", "bias", 0, 0, 1), ("conv2", "weight", 1, 0, 1)} | BN("bn1")


class _Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0, self.ca, self.cb = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(5, 2, 1)

    def forward(self, x):
        a, b = torch.split(self.c0(x), [3, 5], dim=1)
        return self.ca(a) + self.cb(b)


def test_split_gives_each_consumer_its_range():
    g = by_producer(channel_groups(_Split(), IMG))
    c0 = {(m.layer, m.tensor, m.dim, m.offset, m.start, m.length) for m in g["c0"].members}
    assert c0 == {("c0", "weight", 0, 0, 0, 8), ("c0", "bias", 0, 0, 0, 8), ("ca", "weight", 1, 0, 0, 3), ("cb", "weight", 1, 0, 3, 5),
                  ("split", "#1.0", 0, 0, 0, 3), ("split", "#1.1", 0, 0, 3, 5)}  # the sections [3, 5] follow their ranges
    assert g["c0"].prunable
    assert g["ca"].producers == ("ca", "cb") and not g["ca"].prunable  # the sum is the output


def test_cat_of_a_tensor_with_itself_and_chunk():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.d = nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.c(x)
            p, q = torch.cat([y, y], 1).chunk(2, dim=1)
            return self.d(torch.cat([p, q], 1))

    g = by_producer(channel_groups(M(), IMG))
    assert slots(g["c"]) == {("c", "weight", 0, 0, 1), ("c", "bias", 0, 0, 1), ("d", "weight", 1, 0, 1), ("d", "weight", 1, 4, 1)}
    assert g["c"].prunable


def test_transpose_into_linear():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv1d(3, 6, 1), nn.Linear(6, 2)

        def forward(self, x):  # (B, 3, L)
            return self.fc(self.conv(x).transpose(1, 2))

    g = by_producer(channel_groups(M(), torch.randn(2, 3, 7)))
    assert slots(g["conv"]) == {("conv", "weight", 0, 0, 1), ("conv", "bias", 0, 0, 1), ("fc", "weight", 1, 0, 1)}


def test_refusals_name_the_node_and_the_reason():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)
            self.g = nn.Conv2d(3, 4, 1)
            self.grouped = nn.Conv2d(4, 4, 1, groups=2)
            self.lit, self.fc = nn.Conv2d(3, 2, 1), nn.Linear(2 * 8 * 8, 3)

        def forward(self, ids, img):
            e = self.emb(ids)
            a = self.attn(e, e, e)[0]
            h = torch.cumsum(self.g(img), 1)
            k = self.grouped(self.g(img))
            v = self.lit(img).view(2, 128)
            return a.sum() + h.sum() + k.sum() + self.fc(v).sum()

    ids = torch.randint(0, 10, (2, 5))
    g = by_producer(channel_groups(M(), (ids, IMG)))
    assert not g["emb"].prunable and any("nn.MultiheadAttention with bias_k / bias_v" in r for r in g["emb"].blocked_by)
    assert {("emb", "weight", 1, 0, 1)} <= slots(g["emb"])
    assert any("cumsum" in r and "no row" in r for r in g["g"].blocked_by)
    assert any("grouped Conv2d (groups=2)" in r for r in g["grouped"].blocked_by)
    assert g["lit"].prunable and ("view", "#2", 0, 0, 64) in slots(g["lit"])  # view(2, 128): the 128 is rewritten


def test_accepts_a_graph_module_and_leaves_the_model_unchanged():
    model = ResBlock().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = by_producer(channel_groups(fx.symbolic_trace(model), IMG))
    assert g["c2"].producers == ("c2", "down")
    assert model.training and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_fused_qkv_heads_block_where_q_k_v_are_taken_apart():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

        def forward(self, x):  # (B, T, 16), 2 heads of 8
            b, t, _ = x.shape
            q, k, v = self.qkv(x).view(b, t, 3, 2, 8).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, 16)
            return self.proj(a)

    g = by_producer(channel_groups(Attn(), torch.randn(2, 5, 16)))
    assert not g["qkv"].prunable and any("getitem" in r and "indexes or slices the channel dim" in r for r in g["qkv"].blocked_by)


def test_squeeze_excitation_ties_the_gate_to_the_conv():
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc1, self.fc2, self.out = nn.Conv2d(3, 8, 1), nn.Linear(8, 2), nn.Linear(2, 8), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3))))))
            return self.out(y * s.view(s.size(0), s.size(1), 1, 1))

    g = by_producer(channel_groups(SE(), IMG))
    assert g["conv"].producers == ("conv", "fc2") and g["conv"].prunable
    assert slots(g["conv"]) == {("conv", "weight", 0, 0, 1), ("conv", "bias", 0, 0, 1), ("fc1", "weight", 1, 0, 1),
                                ("fc2", "weight", 0, 0, 1), ("fc2", "bias", 0, 0, 1), ("out", "weight", 1, 0, 1)}


def test_bert_through_torch_export_heads_and_mlp_dims_prunable_layernorm_stream_blocked():
    # transformers 5 has no fx tracer: BERT comes in through capture="export"
    tr = pytest.importorskip("transformers")
    from dsd_fx.phases import transform

    model = tr.BertForSequenceClassification(tr.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3, attn_implementation="sdpa")).eval()
    args = (torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long))
    g = by_producer(channel_groups(model, args, capture="export"))
    assert {k for k, v in g.items() if v.prunable} == {
        f"bert.encoder.layer.{i}.{m}" for i in (0, 1) for m in ("attention.self.query", "intermediate.dense")} | {"bert.pooler.dense"}
    assert g["bert.encoder.layer.0.attention.self.query"].size == 4  # 4 heads, not 32 channels
    assert not g["bert.encoder.layer.0.output.dense"].prunable  # the residual stream, through LayerNorm (hidden=False)
    pruned = transform(model, phase="prune", channels=0.25, example_args=args, capture="export")
    shapes = {n: tuple(p.shape) for n, p in pruned.named_parameters()}
    assert shapes["bert.encoder.layer.0.intermediate.dense.weight"] == (48, 32)
    assert shapes["bert.encoder.layer.0.output.dense.weight"] == (32, 48)
    assert shapes["bert.encoder.layer.0.attention.self.query.weight"] == (24, 32)  # 3 heads of 8
    with torch.no_grad():
        assert pruned.eval()(torch.randint(0, 100, (3, 5)), torch.ones(3, 5, dtype=torch.long))["logits"].shape == (3, 3)


def test_keyword_calls_are_followed():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc2(input=F.relu(input=self.fc1(input=x)))

    g = by_producer(channel_groups(M(), torch.randn(2, 4)))
    assert slots(g["fc1"]) == {("fc1", "weight", 0, 0, 1), ("fc1", "bias", 0, 0, 1), ("fc2", "weight", 1, 0, 1)}


def test_functional_weight_ops_follow_their_slots():
    g = by_producer(channel_groups(Functional(), (torch.randn(2, 8), IMG)))
    assert slots(g["w1"]) == {("", "w1", 0, 0, 1), ("", "b1", 0, 0, 1), ("", "w2", 0, 0, 1)}
    assert slots(g["w2"]) == {("", "w2", 1, 0, 1), ("", "bias2", 0, 0, 1), ("", "w3", 0, 0, 1)}
    assert slots(g["k"]) == {("", "k", 0, 0, 1), ("head", "weight", 1, 0, 1)}
    assert g["w3"].producers == ("w3", "head") and not g["w3"].prunable


def test_reshape_to_a_computed_shape_blocks_and_pow_is_elementwise():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):  # (B, T, 4)
            h = self.fc(x.view(-1, 4))
            h = h * torch.pow(h, 3) + 0.5
            return self.out(h.view(x.size()[:-1] + (8,)))  # GPT-2's Conv1D: the 8 is a constant of the graph

    g = by_producer(channel_groups(M(), torch.randn(2, 3, 4)))
    assert not g["fc"].prunable
    assert [r for r in g["fc"].blocked_by if "computed shape (2, 3, 8)" in r] and not [r for r in g["fc"].blocked_by if "pow" in r]


def test_a_layer_called_twice_ties_the_groups_that_reach_it():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):  # c reads a's channels on one call and b's on another: a and b are one group
            return self.c(torch.relu(self.a(x))) + self.c(torch.relu(self.b(x)))

    g = by_producer(channel_groups(M(), IMG))
    assert g["a"].producers == ("a", "b") and g["a"].prunable
    assert slots(g["a"]) == {("a", "weight", 0, 0, 1), ("a", "bias", 0, 0, 1), ("b", "weight", 0, 0, 1), ("b", "bias", 0, 0, 1),
                             ("c", "weight", 1, 0, 1)}


def test_a_layer_reached_by_two_groups_at_overlapping_indices_is_blocked():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.d, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):  # c's input channels 0..3 are a's on one call and d's on the other
            return self.c(torch.cat([self.a(x), self.b(x)], 1)) + self.c(self.d(x))

    g = by_producer(channel_groups(M(), IMG))
    assert any("layer 'c': index 0 of weight dim 1 is in two channel groups" in r for r in g["a"].blocked_by)
    for name in ("a", "b", "d"):
        assert not g[name].prunable and any("of weight dim 1 is in two channel groups" in r for r in g[name].blocked_by)
