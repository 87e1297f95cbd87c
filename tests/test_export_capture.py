"""Capture through torch.export: options, ExportedProgram inputs, modes, aten rows, and the DSD promises on exported graphs."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dsd_fx
from dsd_fx.infra.export_capture import GUARDS, default_dynamic_shapes
from dsd_fx.modes import MODE
from tests.conftest import TinyCNN, prove_once

aten = torch.ops.aten

METHODS = {
    "unstructured": dict(sparsity=0.5),
    "2:4 fixed": dict(pattern="2:4"),
    "sr-ste": dict(pattern="2:4", method="sr-ste"),
    "packed": dict(pattern="2:4", pack=True),
}


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.drop, self.fc2 = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


class ConvNet(nn.Module):
    """A CNN with BatchNorm2d and Dropout, the classic pair whose behaviour depends on the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.drop, self.head = nn.Dropout(0.3), nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(self.drop(x.mean((2, 3))))


class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in (q, k, v))
        att = q @ k.transpose(-2, -1) / math.sqrt(c // self.h)
        causal = torch.tril(torch.ones(t, t, device=x.device, dtype=torch.bool))  # built from the input's length
        att = self.drop(att.masked_fill(~causal, float("-inf")).softmax(-1))
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A hand-written GPT whose causal mask is built from the input's length: torch.fx cannot trace it."""

    def __init__(self, vocab: int = 64, d: int = 32, layers: int = 2, heads: int = 4, ctx: int = 32) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return list(now) == list(before) and all(torch.equal(now[k], before[k]) for k in before)


def _lm_step(gm, opt, ids) -> None:
    loss = F.cross_entropy(gm(ids).flatten(0, 1), ids.flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()


# ---------------------------------------------------------------- capture


def test_export_capture_shares_the_models_parameters_and_buffers_under_their_names():
    model = BNNet()
    gm = dsd_fx.transform(model, capture="export", example_args=(torch.randn(4, 8),), sparsity=0.5)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    assert all(p is params[k] for k, p in gm.named_parameters())
    assert set(dict(gm.named_parameters())) == set(params)
    assert all(gm.get_buffer(k) is b for k, b in buffers.items())
    assert set(gm.state_dict()) - set(model.state_dict()) == {"fc1.weight_mask", "fc2.weight_mask", "_dsd_fx._extra_state"}
    assert any(n.target is aten.linear.default for n in gm.graph.nodes)  # an aten graph
    assert GUARDS not in gm._modules and not any(n.target is aten._assert_tensor_metadata.default for n in gm.graph.nodes)


def test_auto_falls_back_to_export_where_fx_fails_and_the_errors_name_it():
    ids = torch.randint(0, 64, (2, 8))
    with pytest.raises(TypeError, match=r'capture="export", example_args='):
        dsd_fx.transform(GPT())  # fx cannot trace the shape-built mask; no example_args to export with
    with pytest.raises(TypeError, match=r'capture="export", example_args='):
        dsd_fx.transform(GPT(), capture="fx", example_args=(ids,))
    gm = dsd_fx.transform(GPT(), example_args=(ids,))  # "auto"
    assert any(n.target is aten.tril.default for n in gm.graph.nodes)
    fx_gm = dsd_fx.transform(BNNet(), example_args=(torch.randn(2, 8),))  # fx can: auto keeps fx
    assert any(n.op == "call_module" for n in fx_gm.graph.nodes) and not any(n.target is aten.linear.default for n in fx_gm.graph.nodes)


def test_exported_program_and_its_module_are_taken_with_the_models_objects():
    model, x = BNNet(), torch.randn(4, 8)
    ep = torch.export.export(model, (x,), strict=False)
    for given in (ep, ep.module()):
        gm = dsd_fx.transform(given, sparsity=0.5)
        assert gm.fc1.weight is model.fc1.weight and gm.bn.running_mean is model.bn.running_mean
        assert GUARDS not in gm._modules
        gm.eval()  # ep.module() refuses eval(); dsd_fx's graph switches
        assert torch.equal(gm(x), gm(x))
        dsd_fx.transform(gm, phase="dense")


def test_an_exported_program_of_an_eval_mode_model_switches_to_train():
    model, x = BNNet().eval(), torch.randn(8, 8)
    gm = dsd_fx.transform(torch.export.export(model, (x,), strict=False), sparsity=0.5)
    assert not gm.training  # read from its ops: batch norm on running statistics
    torch.testing.assert_close(gm(x), model(x))
    gm.train()
    assert not torch.equal(gm(x), gm(x))  # dropout's p was kept; its flag follows the mode
    assert int(model.bn.num_batches_tracked) == 2  # the count eval-mode export leaves out is put back


def test_captured_at_one_shape_runs_at_others():
    gm = dsd_fx.transform(GPT(), capture="export", example_args=(torch.randint(0, 64, (2, 8)),), sparsity=0.5)
    for shape in ((1, 5), (3, 13), (4, 32)):
        assert gm(torch.randint(0, 64, shape)).shape == (*shape, 64)


def test_default_dynamic_shapes_are_auto_for_every_dim_of_every_tensor():
    shapes = default_dynamic_shapes((torch.zeros(2, 3), 4, (torch.zeros(5),)), {"mask": torch.zeros(2, 3, 1)})
    auto = torch.export.Dim.AUTO
    assert shapes == ({0: auto, 1: auto}, None, ({0: auto},), {0: auto, 1: auto, 2: auto})


def test_bad_capture_input_raises_before_any_change():
    model = GPT()
    before = _snapshot(model)
    ids = torch.randint(0, 64, (2, 8))
    with pytest.raises(ValueError, match=r"example_args=\(inputs,\)"):
        dsd_fx.transform(model, capture="export")
    with pytest.raises(TypeError, match="torch.export could not capture GPT with example_args .*model runs on these inputs"):
        dsd_fx.transform(model, capture="export", example_args=(ids, ids, ids))
    with pytest.raises(TypeError, match="torch.export could not capture GPT.*dynamic_shapes="):
        dsd_fx.transform(model, capture="export", example_args=(ids,), dynamic_shapes=({0: torch.export.Dim("b", max=1)},))
    with pytest.raises(ValueError, match="not a capture mode"):
        dsd_fx.transform(model, capture="jit", example_args=(ids,))
    with pytest.raises(TypeError, match="torch.export could not capture GPT.*tried torch.fx first: capture: torch.fx could not trace"):
        dsd_fx.transform(model, example_args=(ids.float(),))  # neither tracer takes float token ids
    with pytest.raises(ValueError, match="dynamic_shapes= describes the example inputs"):
        dsd_fx.transform(model, capture="export", dynamic_shapes=({0: torch.export.Dim.AUTO},))
    with pytest.raises(TypeError, match="phase='dense' takes no capture, example_args"):
        dsd_fx.transform(dsd_fx.transform(BNNet(), sparsity=0.5), phase="dense", capture="export", example_args=(ids,))
    assert _unchanged(model, before) and not any(n.endswith("_mask") for n, _ in model.named_buffers())


# ---------------------------------------------------------------- train() and eval()


def test_exported_graph_switches_dropout_and_batch_norm_with_the_mode():
    torch.manual_seed(0)
    model = BNNet().eval()  # captured in train mode whatever the model's mode; handed back in its mode
    x = torch.randn(16, 8)
    gm = dsd_fx.transform(model, capture="export", example_args=(x,), sparsity=0.5)
    assert not gm.training and not gm.get_submodule(MODE).training
    ref = copy.deepcopy(model)  # the eager model with the masked weights: the numerics to match
    torch.testing.assert_close(gm(x), ref(x))  # eval: running stats, no dropout
    assert int(model.bn.num_batches_tracked) == 0
    gm.train()
    mean = model.bn.running_mean.clone()
    a, b = gm(x), gm(x)
    assert not torch.equal(a, b)  # dropout is active
    assert int(model.bn.num_batches_tracked) == 2 and not torch.equal(model.bn.running_mean, mean)  # the user's buffers
    gm.eval().eval()  # idempotent
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(gm(x), ref(x))
    dense = dsd_fx.transform(gm, phase="dense")
    assert sum(n.op == "call_module" and n.target == MODE for n in dense.graph.nodes) == 1  # kept by re-dense
    dense.train()
    dense(x)
    assert int(model.bn.num_batches_tracked) == 3
    dense.eval()
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(dense(x), ref.eval()(x))


def test_attention_dropout_chosen_by_mode_in_python_follows_the_graphs_mode():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5 if self.training else 0.0)

    model, x = Attention().eval(), torch.randn(2, 6, 16)
    gm = dsd_fx.transform(model, capture="export", example_args=(x,), sparsity=0.5)
    torch.testing.assert_close(gm(x), model(x))  # eval: no attention dropout
    gm.train()
    assert not torch.equal(gm(x), gm(x))  # the train-mode p, captured although the model was in eval


# ---------------------------------------------------------------- aten rows


class EveryOp(nn.Module):
    """One of every weight op the op table's aten rows cover."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv, self.ct = nn.Conv1d(8, 8, 3, padding=1), nn.ConvTranspose1d(8, 8, 3, padding=1)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.w_mm, self.w_ein, self.w_add = (nn.Parameter(torch.randn(8, 8)) for _ in range(3))
        self.w_bmm = nn.Parameter(torch.randn(2, 8, 8))  # a batch of 2 matrices
        self.fc = nn.Linear(8, 4)

    def forward(self, ids):
        h = self.ct(self.conv(self.emb(ids).transpose(1, 2))).transpose(1, 2)
        h, _ = self.lstm(h)
        h = torch.matmul(h, self.w_mm) + torch.einsum("bsk,kn->bsn", h, self.w_ein)
        h = torch.bmm(h, self.w_bmm)
        h = torch.addmm(self.fc.bias.sum(), h.reshape(-1, 8), self.w_add).reshape(h.shape)
        return self.fc(h)


@pytest.mark.filterwarnings("ignore:The tensor attributes self.lstm")  # torch.export on nn.LSTM
def test_aten_rows_mask_every_weight_op_and_dense_restores_the_graph():
    torch.manual_seed(0)
    model, ids = EveryOp(), torch.randint(0, 10, (2, 5))
    untouched = dsd_fx.transform(copy.deepcopy(model), capture="export", example_args=(ids,), embeddings=True)
    untouched = dsd_fx.transform(untouched, phase="dense")  # the captured graph of the untouched model
    gm = dsd_fx.transform(model, capture="export", example_args=(ids,), sparsity=0.5, embeddings=True)
    want = {"emb.weight", "conv.weight", "ct.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "w_mm", "w_ein",
            "w_bmm", "w_add", "fc.weight"}
    assert set(dsd_fx.current_masks(gm)) == want
    for name in want:
        assert float((gm.get_parameter(name) == 0).float().mean()) == 0.5, name
    ref = copy.deepcopy(model)  # eager, with W * M
    torch.testing.assert_close(gm(ids), ref(ids))
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(2):
        gm(ids).pow(2).mean().backward()
        opt.step()
    masks = dsd_fx.current_masks(gm)
    for name in want:
        assert not (gm.get_parameter(name).detach() * (~masks[name].bool())).any(), name
    dense = dsd_fx.transform(gm, phase="dense")
    assert dense.code == untouched.code and list(dense.state_dict()) == list(model.state_dict())


@pytest.mark.filterwarnings("ignore:The tensor attributes self.lstm")
def test_nm_groups_run_along_each_aten_ops_reduction_dim():
    model = EveryOp()
    gm = dsd_fx.transform(model, capture="export", example_args=(torch.randint(0, 10, (2, 5)),), pattern="2:4")
    keep = dsd_fx.current_masks(gm)
    assert (keep["conv.weight"].movedim(1, -1).reshape(-1, 4).sum(-1) == 2).all()  # (out, in, k): along in
    assert (keep["ct.weight"].movedim(0, -1).reshape(-1, 4).sum(-1) == 2).all()  # (in, out, k): along in
    assert (keep["w_add"].T.reshape(-1, 4).sum(-1) == 2).all()  # addmm's mat2 (in, out): along dim 0
    assert (keep["fc.weight"].reshape(-1, 4).sum(-1) == 2).all()
    assert (keep["lstm.weight_ih_l0"].reshape(-1, 4).sum(-1) == 2).all()


class NoGradBranch(nn.Module):
    """A layer run under torch.no_grad(): torch.export puts it in a wrap_with_set_grad_enabled subgraph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.frozen, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        with torch.no_grad():
            t = self.frozen(x)
        return self.out(self.fc(x) + t)


@pytest.mark.parametrize("method", ["unstructured", "packed"])
def test_a_weight_used_inside_a_higher_order_subgraph_is_masked_there(method):
    torch.manual_seed(0)
    model, x = NoGradBranch(), torch.randn(2, 8)
    untouched = dsd_fx.transform(dsd_fx.transform(copy.deepcopy(model), capture="export", example_args=(x,)), phase="dense")
    reference = copy.deepcopy(model)  # before: packing empties the dense weights
    gm = dsd_fx.transform(model, capture="export", example_args=(x,), **METHODS[method])
    assert any(n.target is torch.ops.higher_order.wrap_with_set_grad_enabled for n in gm.graph.nodes)
    assert set(dsd_fx.current_masks(gm)) == {"fc.weight", "frozen.weight", "out.weight"}
    for name, keep in dsd_fx.current_masks(gm).items():
        reference.get_parameter(name).data.mul_(keep)
    torch.testing.assert_close(gm(x), reference(x))  # the frozen layer computes with W * M
    dense = dsd_fx.transform(gm, phase="dense")
    assert dense.code == untouched.code


def test_push_taps_an_exported_graph_and_prune_shrinks_it():
    model, x, y = BNNet(), torch.randn(8, 8), torch.randint(0, 4, (8,))
    tapped = dsd_fx.transform(model, phase="push", capture="export", example_args=(x,))
    (F.cross_entropy(tapped(x), y) + dsd_fx.push_loss(tapped, y)).backward()  # the classifier's input is tapped
    assert model.fc1.weight.grad is not None
    dense = dsd_fx.transform(tapped, phase="dense").eval()
    torch.testing.assert_close(dense(x), model.eval()(x))
    model.train()
    before = _snapshot(model)
    # the aten channel rows carry fc1 -> batch_norm -> relu -> dropout -> fc2 as one group
    pruned = dsd_fx.transform(model, phase="prune", capture="export", example_args=(x,), channels=0.25, importance="l1")
    assert _unchanged(model, before)
    shapes = {n: tuple(p.shape) for n, p in pruned.named_parameters()}
    assert shapes["fc1.weight"] == (12, 8) and shapes["bn.weight"] == (12,) and shapes["fc2.weight"] == (4, 12)
    assert pruned.eval()(torch.randn(5, 8)).shape == (5, 4)  # another batch size than captured
    assert dsd_fx.verify_pruned(model.eval(), pruned, (x,)).ok


def test_cnn_with_batch_norm_and_dropout_dsd_cycle_proven():
    torch.manual_seed(0)
    model, x = ConvNet(), torch.randn(4, 3, 8, 8)
    reference = copy.deepcopy(model)
    gm = dsd_fx.transform(model, capture="export", example_args=(x,), pattern="2:4", exclude=["conv1"])
    opt = torch.optim.AdamW(gm.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = gm(torch.randn(6, 3, 10, 10)).pow(2).mean()  # another batch and size than captured
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert int(model.bn2.num_batches_tracked) == 3
    dense = dsd_fx.transform(gm, phase="dense")
    reference.load_state_dict(dense.state_dict())
    torch.testing.assert_close(dense.eval()(x), reference.eval()(x))
    report = dsd_fx.verify_zero_overhead(reference, dense, (x,), latency_runs=2)
    assert report.ok, report.table


def test_tiny_cnn_convolutions_of_every_kind():
    model, x = TinyCNN(), torch.randn(2, 3, 8, 8)
    gm = dsd_fx.transform(model, capture="export", example_args=(x,), sparsity=0.5)
    assert set(dsd_fx.current_masks(gm)) == {f"{n}.weight" for n in ("conv1", "conv2", "up", "c1d", "c3d", "t1d", "t3d", "head")}
    torch.testing.assert_close(gm(x), model(x))


# ---------------------------------------------------------------- the hand-written GPT


def test_gpt_with_shape_built_mask_every_sparse_method_trains_redenses_and_proves():
    torch.manual_seed(0)
    model, ids = GPT(), torch.randint(0, 64, (2, 8))
    proven = None  # the code of the first re-densed graph, proven against the untouched model's ONNX export
    for method, options in METHODS.items():
        user = copy.deepcopy(model)
        gm = dsd_fx.transform(user, capture="export", example_args=(ids,), **options)
        opt = torch.optim.AdamW(gm.parameters(), lr=1e-3, weight_decay=0.1)
        for _ in range(3):
            _lm_step(gm, opt, torch.randint(0, 64, (3, 13)))  # another batch size and length than captured
        if method != "packed":  # packed weights have no dense tensor during the S phase
            for name, mask in dsd_fx.current_masks(gm).items():
                w = gm.get_parameter(name)
                assert w.grad is not None and (w.grad * mask).abs().sum() > 0, (method, name)  # gradients reach kept weights
                if method != "sr-ste":  # SR-STE trains the dense weights; its op computes with W * M
                    assert not (w.detach() * (~mask.bool())).any(), (method, name)  # pruned weights stay zero
        dense = dsd_fx.transform(gm, phase="dense")
        assert list(dense.state_dict()) == list(model.state_dict()), method
        assert dense.head.weight is dense.wte.weight  # tied weights stay one tensor
        reference = copy.deepcopy(model)
        reference.load_state_dict(dense.state_dict())
        torch.testing.assert_close(dense.eval()(ids), reference.eval()(ids))
        proven = prove_once(proven, reference, dense, (ids,), method)


def test_dsd_schedule_with_export_capture_runs_dsdsd_and_proves():
    torch.manual_seed(0)
    model, ids = GPT(), torch.randint(0, 64, (2, 8))
    reference = copy.deepcopy(model)
    with pytest.raises(ValueError, match="not a capture mode"):
        dsd_fx.DSD(model, lambda p, lr: torch.optim.SGD(p, lr=lr), 0.1, capture="jit", example_args=(ids,))
    dsd = dsd_fx.DSD(model, lambda p, lr: torch.optim.AdamW(p, lr=lr), 1e-3, sparsity=0.5,
                     capture="export", example_args=(ids,))
    for phase in ("dense", "sparse", "redense", "sparse", "redense"):  # DSDSD: the second sparse re-uses the graph
        gm, opt = dsd.begin(phase)
        _lm_step(gm, opt, torch.randint(0, 64, (3, 12)))
    assert list(gm.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(gm.state_dict())
    report = dsd_fx.verify_zero_overhead(reference, gm, (ids,), latency_runs=2)
    assert report.ok, report.table


def test_export_onnx_takes_dynamic_shapes():
    gm = dsd_fx.transform(GPT(), capture="export", example_args=(torch.randint(0, 64, (2, 8)),), sparsity=0.5)
    auto = torch.export.Dim.AUTO
    proto = dsd_fx.export_onnx(gm, (torch.randint(0, 64, (2, 8)),), dynamic_shapes=({0: auto, 1: auto},))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in dims)  # symbolic batch and length


# ---------------------------------------------------------------- copies, files, compile


def test_sparse_exported_graph_survives_deepcopy_save_load_and_compiles_without_breaks():
    torch.manual_seed(0)
    model, x = BNNet(), torch.randn(4, 8)
    gm = dsd_fx.transform(model, capture="export", example_args=(x,), sparsity=0.5).eval()
    want = gm(x)
    torch.testing.assert_close(copy.deepcopy(gm)(x), want)
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), want)
    loaded.train()
    loaded(x)  # batch norm counts in train mode after the reload too
    assert int(loaded.bn.num_batches_tracked) == 1
    dsd_fx.transform(loaded, phase="dense")
    gm.train()
    torch._dynamo.reset()
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    compiled(x).sum().backward()
    assert gm.fc1.weight.grad is not None


class KwargsNet(nn.Module):
    """Takes a keyword input through **kwargs, which torch.export cannot give dynamic dims."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, **kw):
        return self.fc(x) * kw["scale"]


def test_a_keyword_input_through_var_kwargs_is_refused_naming_the_fix_before_any_change():
    model, x = KwargsNet(), torch.randn(4, 8)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"'scale' reaches KwargsNet\.forward through \*\*kw.*named parameter"):
        dsd_fx.transform(model, capture="export", example_args=(x,), example_kwargs={"scale": torch.randn(4, 8)})
    assert _unchanged(model, before)
