"""Every weight-bearing layer kind: S-phase output, exact sparsity, N:M direction, re-dense, ONNX proof."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

import dsd_fx
from conftest import assert_rejected, isomorphic, masked_reference


class RecurrentNet(nn.Module):
    """An RNN layer (LSTM by default; keyword arguments go to it), then a Linear on the last step."""

    def __init__(self, cls=nn.LSTM, **kw):
        super().__init__()
        self.rnn = cls(8, 16, batch_first=True, **kw)
        self.head = nn.Linear((kw.get("proj_size") or 16) * (2 if kw.get("bidirectional") else 1), 4)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def lstm_net(bidirectional=True):
    return RecurrentNet(num_layers=2, bidirectional=bidirectional)


class CellNet(nn.Module):
    """A cell reused across 3 time steps: each weight has 3 uses and one mask."""

    def __init__(self, cls):
        super().__init__()
        self.cell = cls(8, 16)
        self.lstm = cls is nn.LSTMCell

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 16)
        state = (h, torch.zeros_like(h)) if self.lstm else h
        for t in range(3):
            state = self.cell(x[:, t], state)
        return state[0] if self.lstm else state


class Attention(nn.Module):
    def __init__(self, separate=False):
        super().__init__()
        extra = {"kdim": 12, "vdim": 12} if separate else {}
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True, **extra)
        self.separate = separate

    def forward(self, x):
        kv = torch.cat([x, x[..., :12] * 0 + 1], -1)[..., :12] if self.separate else x
        out, _ = self.attn(x, kv, kv, need_weights=False)
        return out


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)

    def forward(self, x, memory):
        return self.layer(x, memory)


class Stacks(nn.Module):
    """nn.TransformerEncoder and nn.Transformer: leaves holding layers that hold the weights."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, 0.0, batch_first=True), 2)
        self.t = nn.Transformer(16, 4, 1, 1, 32, 0.0, batch_first=True)

    def forward(self, x):
        return self.t(self.enc(x), x)


class GroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)

    def forward(self, x):
        return self.depthwise(F.relu(self.grouped(x)))


class BmmEinsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.w_bmm = nn.Parameter(torch.randn(3, 8, 4))
        self.w_ein = nn.Parameter(torch.randn(4, 8, 6))

    def forward(self, x):  # x: 3 x 5 x 8
        return torch.bmm(x, self.w_bmm).sum(-1) + torch.einsum("bti,kio->bk", x, self.w_ein).sum(-1, keepdim=True)


class TiedLM(nn.Module):
    """Embedding tied to the output projection, as in GPT-2 and T5."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.proj = nn.Linear(16, 16)
        self.out = nn.Linear(16, 32, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.proj(self.emb(idx))))


x_seq = lambda: (torch.randn(2, 5, 8),)  # noqa: E731
CASES = {
    "lstm_bidirectional": (lstm_net, x_seq, 9),
    "lstm_proj_size": (lambda: RecurrentNet(proj_size=8), x_seq, 4),
    "gru": (lambda: RecurrentNet(nn.GRU), x_seq, 3),
    "rnn": (lambda: RecurrentNet(nn.RNN), x_seq, 3),
    "lstm_cell": (lambda: CellNet(nn.LSTMCell), lambda: (torch.randn(2, 3, 8),), 2),
    "gru_cell": (lambda: CellNet(nn.GRUCell), lambda: (torch.randn(2, 3, 8),), 2),
    "rnn_cell": (lambda: CellNet(nn.RNNCell), lambda: (torch.randn(2, 3, 8),), 2),
    "mha_packed": (Attention, lambda: (torch.randn(2, 5, 16),), 2),
    "mha_separate_qkv": (lambda: Attention(separate=True), lambda: (torch.randn(2, 5, 16),), 4),
    "transformer_encoder_layer": (Encoder, lambda: (torch.randn(2, 5, 16),), 4),
    "transformer_decoder_layer": (Decoder, lambda: (torch.randn(2, 5, 16), torch.randn(2, 7, 16)), 6),
    "transformer_stacks": (Stacks, lambda: (torch.randn(2, 5, 16),), 18),
    "grouped_depthwise_conv": (GroupedConv, lambda: (torch.randn(2, 8, 6, 6),), 2),
    "bmm_einsum": (BmmEinsum, lambda: (torch.randn(3, 5, 8),), 2),
}


def _masks(gm):
    return {n[: -len("_mask")]: b for n, b in gm.named_buffers() if n.endswith("_mask")}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_layer_sparse_then_dense(case):
    make, args, n_masked = CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    example = args()
    sparse = dsd_fx.transform(model, sparsity=0.5)
    masks = _masks(sparse)
    assert len(masks) == n_masked, sorted(masks)
    for name, mask in masks.items():
        assert mask.sum().item() == mask.numel() - round(0.5 * mask.numel()), name  # exact per weight
    mask_nodes = [n for n in sparse.graph.nodes if n.target is dsd_fx.ops.mask_mul]
    assert len({n.args[1].target for n in mask_nodes}) == n_masked  # one mask node (or more, per use) per weight
    with torch.no_grad():
        torch.testing.assert_close(sparse(*example), masked_reference(original, masks)(*example), rtol=1e-5, atol=1e-5)
    out = sparse.train()(*example)
    out.float().pow(2).mean().backward()  # one step: gradients reach every masked weight, masked
    for name, p in sparse.named_parameters():
        if name in masks:
            assert p.grad is not None and not (p.grad * ~masks[name].bool()).any(), name
    dense = dsd_fx.transform(sparse, phase="dense").eval()
    assert list(dense.state_dict()) == keys
    assert isomorphic(dense, fx.symbolic_trace(original))
    if case == "lstm_proj_size":  # torch's ONNX LSTM for proj_size fails in onnxruntime even never sparsified
        proto = dsd_fx.export_onnx(dense, example)
        assert dsd_fx.compare_onnx(dsd_fx.export_onnx(original, example), proto).ok
        return
    report = dsd_fx.verify_zero_overhead(original, dense, example, latency_runs=2)
    assert report.ok, report.table


@pytest.mark.parametrize("case", ["lstm_bidirectional", "gru", "mha_packed", "transformer_encoder_layer", "lstm_cell"])
@pytest.mark.parametrize("method", ["fixed", "sr-ste"])
def test_layer_nm_runs_along_the_input_dimension(case, method):
    make, args, n_masked = CASES[case]
    torch.manual_seed(0)
    model = make()
    sparse = dsd_fx.transform(model, pattern="2:4", method=method)
    masks = dsd_fx.current_masks(sparse)
    assert len(masks) == n_masked
    for name, keep in masks.items():
        groups = keep.reshape(keep.shape[0], -1, 4)  # dim 1: input features, for every gate block row
        assert (groups.sum(-1) == 2).all(), name
    sparse(*args()).float().sum().backward()
    dense = dsd_fx.transform(sparse, phase="dense")
    for name, keep in masks.items():
        w = dense.get_parameter(name).detach()
        assert ((w != 0) <= keep).all(), name  # pruned weights restart from zero


def test_lstm_gate_blocks_each_exactly_sparse():
    model = lstm_net(bidirectional=False)
    before = model.rnn.weight_hh_l0.detach().clone().numpy()
    sparse = dsd_fx.transform(model, sparsity=0.5)
    w = model.rnn.weight_hh_l0.detach()  # 4 gate blocks (i, f, g, o) of 16 rows each
    # expected independently: the half of the whole matrix with the smallest |w| (stable ranks), per block
    order = np.argsort(np.abs(before).ravel(), kind="stable")[: before.size // 2]
    pruned = np.zeros(before.size, dtype=bool)
    pruned[order] = True
    expected = pruned.reshape(before.shape).reshape(4, -1).sum(1)
    assert [int((block == 0).sum()) for block in w.chunk(4)] == expected.tolist()
    assert float((w == 0).float().mean()) == 0.5
    assert "module_call" in sparse.code


def test_packed_lstm_keeps_packed_storage_and_round_trips():
    torch.manual_seed(0)
    model = lstm_net()
    example = x_seq()
    sparse = dsd_fx.transform(model, pattern="2:4", pack=True)
    assert any(n.endswith("weight_ih_l0_values") for n, _ in sparse.named_parameters())
    sparse(*example).sum().backward()
    dense = dsd_fx.transform(sparse, phase="dense")
    assert [n for n, _ in dense.named_parameters()] == [n for n, _ in lstm_net().named_parameters()]
    assert dsd_fx.verify_zero_overhead(lstm_net(), dense, example, latency_runs=2).ok


def test_tied_embedding_gets_one_mask_at_every_use():
    torch.manual_seed(0)
    model = TiedLM()
    idx = torch.randint(0, 32, (2, 6))
    sparse = dsd_fx.transform(model, sparsity=0.5)
    masks = _masks(sparse)
    assert sorted(masks) == ["emb.weight", "proj.weight"]  # the tied table is masked through its Linear use
    uses = [n for n in sparse.graph.nodes if n.target is dsd_fx.ops.mask_mul and n.args[1].target == "emb.weight_mask"]
    assert len(uses) == 2  # the lookup and the projection, one buffer
    with torch.no_grad():
        torch.testing.assert_close(sparse(idx), masked_reference(copy.deepcopy(model), masks)(idx))
    dense = dsd_fx.transform(sparse, phase="dense")
    assert dense.emb.weight is dense.out.weight  # still one tensor
    assert list(dense.state_dict()) == list(TiedLM().state_dict())


def test_tied_weight_nm_follows_both_uses():
    model = TiedLM()
    sparse = dsd_fx.transform(model, pattern="2:4")
    keep = dsd_fx.current_masks(sparse)["emb.weight"]
    assert (keep.reshape(32, -1, 4).sum(-1) == 2).all()  # the lookup's rows and the projection's inputs agree


def test_embedding_is_opt_in():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.fc = nn.Linear(8, 2)

        def forward(self, idx):
            return self.fc(self.emb(idx).mean(1))

    assert sorted(_masks(dsd_fx.transform(Bag(), sparsity=0.5))) == ["fc.weight"]
    sparse = dsd_fx.transform(Bag(), sparsity=0.5, embeddings=True)
    assert sorted(_masks(sparse)) == ["emb.weight", "fc.weight"]
    dense = dsd_fx.transform(sparse, phase="dense")
    assert dsd_fx.verify_zero_overhead(Bag(), dense, (torch.randint(0, 20, (2, 3)),), latency_runs=2).ok
    assert_rejected({"include": ["emb.weight"]}, ValueError, ["nn.Embedding", "embeddings=True"], Bag())


def test_nm_refuses_a_weight_used_along_two_dimensions():
    class TwoWays(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return F.linear(x, self.w) + x @ self.w  # reduces along dim 1, then along dim 0

    assert_rejected({"pattern": "2:4"}, ValueError, ["'w'", "different reduction dimensions", "exclude=['w']"], TwoWays())


def test_nm_refuses_an_einsum_contracting_two_dims():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 8))

        def forward(self, x):
            return torch.einsum("bij,ij->b", x, self.w)

    assert_rejected({"pattern": "2:4"}, ValueError, ["'w'", "several dimensions", "exclude=['w']"], Two())
    sparse = dsd_fx.transform(Two(), sparsity=0.5)  # unstructured is fine
    assert sorted(_masks(sparse)) == ["w"]
