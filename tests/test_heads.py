"""Attention heads, grouped KV heads and SwiGLU channels as channel groups, and pruning them."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn as nn

from dsd_fx.channels import channel_groups
from dsd_fx.phases import transform
from dsd_fx.infra.pipeline import NOTES
from dsd_fx.pruned_attention import PrunedMultiheadAttention
from tests.channel_models import Attention, Block, FusedAttention, SwiGLU, TinyGPT

X = torch.randn(2, 5, 32)
HOWS = ["sdpa", "softmax", "gqa", "interleave"]


def by_producer(groups):
    return {g.name: g for g in groups}


def slots(group) -> set[tuple]:
    return {(m.layer, m.tensor, m.dim, m.offset, m.repeat) for m in group.members}


def rows(idx: list[int], width: int) -> list[int]:
    return [h * width + k for h in idx for k in range(width)]


def kill_heads(model: Attention, q_heads: list[int], kv_heads: list[int]) -> Attention:
    """Zero the query heads' rows of q_proj and columns of o_proj, the KV heads' rows of k_proj and v_proj."""
    d = model.d
    with torch.no_grad():
        for t in (model.q_proj.weight, model.q_proj.bias):
            t.index_fill_(0, torch.tensor(rows(q_heads, d)), 0.0)
        model.o_proj.weight.index_fill_(1, torch.tensor(rows(q_heads, d)), 0.0)
        for t in (model.k_proj.weight, model.k_proj.bias, model.v_proj.weight, model.v_proj.bias):
            t.index_fill_(0, torch.tensor(rows(kv_heads, d)), 0.0)
    return model


@pytest.mark.parametrize("how", ["sdpa", "softmax"])
def test_multi_head_attention_one_unit_per_head(how):
    g = by_producer(channel_groups(Attention(32, 4, how=how), X))
    heads = g["q_proj"]
    assert heads.prunable and heads.size == 4 and heads.width == 8
    assert heads.producers == ("q_proj", "k_proj", "v_proj")
    want = {(f"{p}_proj", t, 0, 0, 8) for p in "qkv" for t in ("weight", "bias")} | {("o_proj", "weight", 1, 0, 8)}
    assert {s for s in slots(heads) if not s[1].startswith("#")} == want
    sizes = {(m.layer, m.tensor, m.repeat) for m in heads.members if m.role == "size"}
    assert {(t, r) for _, t, r in sizes} == {("#3", 1), ("#3", 8)}  # view(b, t, 4, 8) x2 and reshape(b, t, 32)
    assert not g["o_proj"].prunable


@pytest.mark.parametrize("how", HOWS)
def test_grouped_kv_heads_one_unit_per_kv_head_and_its_query_heads(how):
    g = by_producer(channel_groups(Attention(32, 4, kv=2, how=how), X))
    unit = g["q_proj"]
    assert unit.prunable and unit.size == 2 and unit.width == 16  # a KV head (8 channels) with its 2 query heads (16)
    assert unit.producers == ("q_proj", "k_proj", "v_proj")
    want = ({("q_proj", t, 0, 0, 16) for t in ("weight", "bias")} | {(f"{p}_proj", t, 0, 0, 8) for p in "kv" for t in ("weight", "bias")}
            | {("o_proj", "weight", 1, 0, 16)})
    assert {s for s in slots(unit) if not s[1].startswith("#")} == want
    assert ("view", "#3", 0, 0, 2) in slots(unit)  # view(b, t, 4, 8): 2 of the 4 query heads per KV head


@pytest.mark.parametrize("how", HOWS)
def test_dead_heads_removed_with_the_same_output_at_other_sizes(how):
    kv = 4 if how in ("sdpa", "softmax") else 2
    dead_kv = [1] if kv == 2 else [0, 2]
    dead_q = [h for k in dead_kv for h in range(k * 4 // kv, (k + 1) * 4 // kv)]
    model = kill_heads(Attention(32, 4, kv=kv, how=how), dead_q, dead_kv).eval()
    gm = transform(model, phase="prune", channels=0.5, example_args=(X,)).eval()
    assert gm.q_proj.weight.shape == (16, 32) and gm.o_proj.weight.shape == (32, 16)
    assert gm.k_proj.weight.shape == gm.v_proj.weight.shape == (kv * 4, 32)
    for shape in ((2, 5, 32), (3, 9, 32), (1, 1, 32)):
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    assert "view(getitem, getitem_1, 2, 8)" in gm.code  # the literal head count rewritten
    text = gm.meta[NOTES]["prune_channels"]
    assert re.search(r"group 'q_proj' \(q_proj, k_proj, v_proj\): (4 -> 2|2 -> 1) units of (8|16) channels", text)
    assert "sizes in the code:" in text and "-> 16" in text


def test_head_scores_sum_every_slice_of_the_head():
    model = Attention(32, 4).eval()
    with torch.no_grad():
        model.v_proj.weight[16:24] *= 1e-3  # head 2's v rows and o columns small: head 2 goes first
        model.o_proj.weight[:, 16:24] *= 1e-3
    gm = transform(model, phase="prune", channels=0.25, example_args=(X,))
    torch.testing.assert_close(gm.q_proj.weight, torch.cat([model.q_proj.weight[:16], model.q_proj.weight[24:]]), rtol=0, atol=0)
    torch.testing.assert_close(gm.o_proj.weight, torch.cat([model.o_proj.weight[:, :16], model.o_proj.weight[:, 24:]], 1),
                               rtol=0, atol=0)


def test_a_fraction_never_removes_every_head():
    gm = transform(Attention(32, 4, kv=2, how="gqa"), phase="prune", channels=0.99, example_args=(X,))
    assert gm.k_proj.out_features == 8 and gm.q_proj.out_features == 16 and gm(X).shape == X.shape


def test_swiglu_gate_and_up_tied_through_the_product():
    g = by_producer(channel_groups(SwiGLU(), X))
    assert slots(g["gate_proj"]) == {("gate_proj", "weight", 0, 0, 1), ("up_proj", "weight", 0, 0, 1), ("down_proj", "weight", 1, 0, 1)}
    dead = list(range(0, 64, 4))
    model = SwiGLU().eval()
    with torch.no_grad():
        model.up_proj.weight[dead] = 0.0
        model.gate_proj.weight[dead] = 0.0
        model.down_proj.weight[:, dead] = 0.0
    gm = transform(model, phase="prune", channels=0.25, example_args=(X,)).eval()
    assert gm.gate_proj.out_features == gm.up_proj.out_features == gm.down_proj.in_features == 48
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X))
    gm = transform(SwiGLU(), phase="prune", channels=0.3, round_to=16, example_args=(X,))
    assert gm.up_proj.out_features == 48  # floor(0.3 * 64) = 19 removed would keep 45: rounded up to 48


def test_llama_block_heads_and_mlp_pruned_residual_kept():
    model = Block().eval()
    g = by_producer(channel_groups(model, X))
    assert {k for k, v in g.items() if v.prunable} == {"attn.q_proj", "mlp.gate_proj"}
    gm = transform(model, phase="prune", channels=0.5, example_args=(X,)).eval()
    assert gm.attn.q_proj.weight.shape == (16, 32) and gm.attn.k_proj.weight.shape == (8, 32)
    assert gm.mlp.up_proj.weight.shape == (32, 32) and gm.norm1.weight.shape == (32,)
    assert gm(torch.randn(3, 7, 32)).shape == (3, 7, 32)


def test_inplace_refuses_literal_head_counts_before_anything_changes():
    model = Attention(32, 4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"inplace=True cannot rewrite .* numbers \(head counts or widths in 'reshape', 'view', 'view_1'\)"):
        transform(model, phase="prune", channels=0.5, example_args=(X,), inplace=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Encoder(nn.Module):
    def __init__(self, batch_first: bool = True, weights: bool = False) -> None:
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(32), nn.Linear(32, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.weights = weights

    def forward(self, x):
        h = self.ln(x)
        a, w = self.attn(h, h, h)
        return x + self.fc(torch.relu(a)) + (w.sum() if self.weights else 0)


def test_multihead_attention_heads_in_the_packed_in_proj():
    g = by_producer(channel_groups(_Encoder(), X))
    heads = g["attn"]
    assert heads.prunable and heads.size == 4 and heads.width == 8
    assert slots(heads) == {("attn", t, 0, k * 4, 8) for t in ("in_proj_weight", "in_proj_bias") for k in range(3)} | {
        ("attn.out_proj", "weight", 1, 0, 8)}
    assert slots(g["attn.out_proj"]) == {("attn.out_proj", "weight", 0, 0, 1), ("attn.out_proj", "bias", 0, 0, 1), ("fc", "weight", 1, 0, 1)}
    used = by_producer(channel_groups(_Encoder(weights=True), X))["attn"]
    assert not used.prunable and any("attention weights (averaged over the heads) are used" in r for r in used.blocked_by)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_dead_heads_removed_with_the_same_output(batch_first):
    model = _Encoder(batch_first).eval()
    dead = rows([1], 8)
    with torch.no_grad():
        for k in range(3):
            model.attn.in_proj_weight[[k * 32 + i for i in dead]] = 0.0
            model.attn.in_proj_bias[[k * 32 + i for i in dead]] = 0.0
        model.attn.out_proj.weight[:, dead] = 0.0
    gm = transform(model, phase="prune", channels={"attn": 0.25}, example_args=(X,)).eval()
    assert isinstance(gm.attn, PrunedMultiheadAttention) and gm.attn.num_heads == 3
    assert gm.attn.in_proj_weight.shape == (72, 32) and gm.attn.out_proj.weight.shape == (32, 24)
    assert type(model.attn) is nn.MultiheadAttention and model.attn.num_heads == 4
    for shape in ((2, 5, 32), (3, 7, 32)):
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="inplace=True cannot write pruned heads into nn.MultiheadAttention 'attn'"):
        transform(model, phase="prune", channels={"attn": 0.25}, example_args=(X,), inplace=True)


MASKS = [dict(), dict(need_weights=False), dict(attn_mask=torch.randn(5, 5)), dict(attn_mask=torch.ones(5, 5, dtype=torch.bool).triu(1)),
         dict(key_padding_mask=torch.tensor([[False] * 4 + [True]] * 2)), dict(average_attn_weights=False),
         dict(attn_mask=torch.ones(5, 5, dtype=torch.bool).triu(1), need_weights=False)]


@pytest.mark.parametrize("options", MASKS, ids=[",".join(o) or "default" for o in MASKS])
@pytest.mark.parametrize("batch_first", [True, False])
def test_pruned_multihead_attention_computes_what_nn_multihead_attention_does(options, batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    mine = copy.deepcopy(mha)
    mine.__class__ = PrunedMultiheadAttention
    x = X if batch_first else X.transpose(0, 1)
    y = torch.randn_like(x)
    with torch.no_grad():
        for q, k, v in ((x, x, x), (y, x, x), (x, y, y.flip(0))):  # self-attention, cross-attention, separate values
            want, got = mha(q, k, v, **options), mine(q, k, v, **options)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
            assert (got[1] is None) == (want[1] is None)
            if want[1] is not None:
                torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine(X[0], X[0], X[0])[0], mha(X[0], X[0], X[0])[0], rtol=1e-5, atol=1e-5)  # unbatched


IDS = torch.randint(0, 50, (2, 7))


@pytest.mark.parametrize("rms", [False, True])
def test_residual_stream_blocked_by_its_norms_unless_hidden(rms):
    stream = by_producer(channel_groups(TinyGPT(rms=rms), IDS))["tok"]
    assert not stream.prunable
    if not rms:
        assert any("node 'ln1': LayerNorm normalises over the channel dim" in r and "hidden=True prunes these channels too" in r
                   for r in stream.blocked_by)
    else:  # the hand-written RMSNorm's mean of squares
        assert any("reduces over the channel dim (a norm's statistics? hidden=True prunes through them)" in r for r in stream.blocked_by)
    g = by_producer(channel_groups(TinyGPT(rms=rms), IDS, hidden=True))
    norms = {(n, t, 0, 0, 1) for n in ("ln1", "ln2", "ln_f") for t in (("weight",) if rms else ("weight", "bias"))}
    assert slots(g["tok"]) == {("tok", "weight", 1, 0, 1), ("pos", "weight", 1, 0, 1), ("lm_head", "weight", 1, 0, 1),
                               ("attn.o_proj", "weight", 0, 0, 1), ("attn.o_proj", "bias", 0, 0, 1), ("fc2", "weight", 0, 0, 1),
                               ("fc2", "bias", 0, 0, 1), ("fc1", "weight", 1, 0, 1)} | {
        (f"attn.{p}_proj", "weight", 1, 0, 1) for p in "qkv"} | norms
    assert g["tok"].prunable and g["tok"].producers == ("tok", "pos", "attn.o_proj", "fc2")
    assert g["attn.q_proj"].size == 4 and g["fc1"].size == 128 and not g["lm_head"].prunable


@pytest.mark.parametrize("rms", [False, True])
def test_hidden_prunes_embeddings_norms_and_the_tied_lm_head_alike(rms):
    model = TinyGPT(rms=rms).eval()
    gm = transform(model, phase="prune", channels=0.25, hidden=True, example_args=(IDS,)).eval()
    assert gm.tok.weight.shape == (50, 24) and gm.lm_head.weight is gm.tok.weight and gm.pos.weight.shape == (16, 24)
    assert gm.ln1.weight.shape == (24,) and (rms or gm.ln1.normalized_shape == (24,))
    assert gm.attn.q_proj.weight.shape == (24, 24) and gm.attn.o_proj.weight.shape == (24, 24) and gm.fc1.weight.shape == (96, 24)
    assert model.tok.weight.shape == (50, 32) and model.lm_head.weight is model.tok.weight
    with torch.no_grad():
        assert gm(torch.randint(0, 50, (3, 11))).shape == (3, 11, 50)


def test_round_to_rounds_channel_groups_and_leaves_head_groups_whole_heads():
    gm = transform(Block(), phase="prune", channels=0.5, round_to=24, example_args=(X,))
    assert gm.mlp.up_proj.out_features == 48  # 32 kept, rounded up to a multiple of 24
    assert gm.attn.q_proj.out_features == 16 and gm.attn.k_proj.out_features == 8  # 1 of 2 KV groups, not rounded


def test_grow_refuses_head_groups_before_anything_changes():
    model = Attention(32, 4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"grow: the channel group of 'q_proj' is attention heads \(4 units of 8 channels\)"):
        transform(model, phase="grow", at=["q_proj"], width=4, example_args=(X,))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("how", ["sdpa", "gqa"])
def test_verify_pruned_same_onnx_ops_smaller_shapes(how):
    from dsd_fx.proof.pruned import verify_pruned

    model = Attention(32, 4, kv=2, how=how).eval()
    gm = transform(model, phase="prune", channels=0.5, example_args=(X,))
    report = verify_pruned(model, gm, (X,), latency_runs=1)
    assert report.ok, report.table


class _NanoAttention(nn.Module):
    """nanoGPT's attention with separate projections: the width back is x.size()'s C, not the heads'."""

    def __init__(self, n_embd: int = 32, n_head: int = 4) -> None:
        super().__init__()
        self.n_head = n_head
        self.q, self.k, self.v, self.c_proj = (nn.Linear(n_embd, n_embd) for _ in range(4))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (p(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


def test_a_width_computed_from_another_tensor_blocks_the_heads_with_the_remedy():
    heads = by_producer(channel_groups(_NanoAttention(), X))["q"]
    assert heads.size == 4 and not heads.prunable
    assert any("reshapes with a size computed elsewhere ('getitem_2') at the channel dim" in r and "write -1" in r
               for r in heads.blocked_by)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_fused_qkv_split_by_an_int_heads_cut_alike_in_q_k_and_v(capture):
    model = FusedAttention().eval()
    heads = by_producer(channel_groups(model, X, capture=capture))["c_attn"]
    assert heads.prunable and heads.size == 4 and heads.width == 8
    assert {s for s in slots(heads) if not s[1].startswith("#")} == {
        ("c_attn", t, 0, k * 4, 8) for t in ("weight", "bias") for k in range(3)} | {("c_proj", "weight", 1, 0, 8)}
    with torch.no_grad():  # head 1 dead in q, k and v, and in c_proj's columns
        for part in (0, 32, 64):
            model.c_attn.weight[part + 8:part + 16] = 0.0
            model.c_attn.bias[part + 8:part + 16] = 0.0
        model.c_proj.weight[:, 8:16] = 0.0
    gm = transform(model, phase="prune", channels=0.25, example_args=(X,), capture=capture).eval()
    assert gm.c_attn.weight.shape == (72, 32) and gm.c_proj.weight.shape == (32, 24)
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_cost_counts_multihead_attention_and_its_pruned_heads():
    from dsd_fx.channels.macs import cost

    model = _Encoder().eval()
    t = 2 * 5  # tokens; E = 32, 4 heads of 8: in-proj 3 t E E, out-proj t E E, q @ k^T and attn @ v 2 t 5 E
    assert cost(model, X).per_node["attn"] == 4 * t * 32 * 32 + 2 * t * 5 * 32
    gm = transform(model, phase="prune", channels={"attn": 0.25}, example_args=(X,))
    assert cost(gm, X).per_node["attn"] == 3 * t * 32 * 24 + t * 24 * 32 + 2 * t * 5 * 24


class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.fc = Attention(32, 4), nn.Linear(32, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.attn(x)).mean(1))


def test_discriminant_importance_scores_heads_through_the_output_projection():
    torch.manual_seed(0)
    model = _Classifier().eval()
    with torch.no_grad():
        model.attn.o_proj.weight[:, 16:24] = 0.0  # head 2 writes nothing: no class separation flows back to it
    x, y = torch.randn(32, 5, 32), torch.randint(0, 3, (32,))
    gm = transform(model, phase="prune", channels={"attn.q_proj": 0.25}, importance="discriminant", data=[(x, y)], example_args=(x,))
    kept = gm.attn.o_proj.weight
    assert kept.shape == (32, 24) and bool((kept != 0).all(dim=0).all())  # the dead head's columns are the ones gone
