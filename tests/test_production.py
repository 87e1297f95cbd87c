"""Training at scale and in production: DDP, torch.compile, torch.export, checkpoints, mixed precision."""
import copy
import io
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dsd_fx
from ddp_worker import MODES, make_model, train
from test_layers import Encoder, RecurrentNet

HERE = pathlib.Path(__file__).resolve().parent
OPS = {"mask": dsd_fx.ops.mask_mul, "nm-fixed": dsd_fx.ops.mask_mul,
       "sr-ste": torch.ops.dsd_fx.sparsify_nm.default, "packed": torch.ops.dsd_fx.nm_linear.default}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(net, opt, x, y):
    opt.zero_grad()
    loss = F.mse_loss(net(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


# ---------------------------------------------------------------- DDP


def _two_ranks(mode, tmp_path, how="ddp"):
    """Start ranks 0 and 1 on 127.0.0.1 (a free port, 180 s at most, always cleaned up); their saved states."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(HERE / "ddp_worker.py")]
    procs = [subprocess.Popen([*cmd, str(r), "2", str(port), mode, str(tmp_path), how],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("mode", [*MODES, "export"])  # export: the graph captured through torch.export
def test_ddp_two_processes_gloo(mode, tmp_path):
    r0, r1 = _two_ranks(mode, tmp_path)
    assert r0["masks"].keys() == r1["masks"].keys() and r0["masks"]
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name  # the same masks on both ranks
    single = train(mode)  # one process, the same global batches
    for name, p in single.named_parameters():
        torch.testing.assert_close(r0["params"][name], p.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r1["params"][name], p.detach(), rtol=1e-5, atol=1e-6)
    assert r0["proof"] is True  # re-dense on rank 0, ONNX verified


def test_push_loss_synced_under_ddp_is_the_one_process_global_batch_loss(tmp_path):
    """sync=True: every rank's push loss is the global batch's (an uneven 5 + 3 split included),
    and two DDP ranks train to the parameters of one process over the same global batches; with
    each rank's local batch (sync=False, simulated in one process) they would not."""
    from ddp_worker import train_push

    r0, r1 = _two_ranks("push", tmp_path, "push")
    for synced, whole in (r0["values"], r1["values"]):
        assert synced == pytest.approx(whole, rel=1e-5, abs=1e-6)
    single = train_push()
    for name, p in single.named_parameters():
        torch.testing.assert_close(r0["params"][name], p.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r1["params"][name], p.detach(), rtol=1e-5, atol=1e-6)
    local = train_push(local=2)  # what DDP without sync trains: each half's push loss, averaged
    assert not torch.allclose(local.get_parameter("0.weight"), single.get_parameter("0.weight"), atol=1e-4)


def _has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_fsdp2(), reason="this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
@pytest.mark.parametrize("mode", list(MODES))
def test_fsdp2_fully_shard_two_processes_gloo_cpu(mode, tmp_path):
    r0, r1 = _two_ranks(mode, tmp_path, "fsdp2")
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name  # buffers are replicated, not sharded
    single = train(mode)
    for name, p in single.named_parameters():  # the gathered shards equal the one-process run
        torch.testing.assert_close(r0["params"][name], p.detach(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- torch.compile / torch.export


@pytest.mark.parametrize("mode", list(MODES))
def test_inductor_compiles_each_mode_without_graph_break(mode):
    torch.manual_seed(0)
    eager = dsd_fx.transform(make_model(), **MODES[mode])
    twin = copy.deepcopy(eager)
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    assert torch._dynamo.explain(eager)(x).graph_break_count == 0
    compiled = torch.compile(twin, backend="inductor")
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    F.mse_loss(eager(x), y).backward()
    F.mse_loss(compiled(x), y).backward()
    for (name, a), b in zip(eager.named_parameters(), twin.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", list(MODES))
def test_torch_export_each_phase(mode):
    sparse = dsd_fx.transform(make_model(), **MODES[mode])
    x = torch.randn(4, 16)
    ep = torch.export.export(sparse, (x,))
    op = OPS[mode]
    target = torch.ops.aten.mul.Tensor if op is dsd_fx.ops.mask_mul else op
    assert sum(n.target is target for n in ep.graph.nodes) == 2  # one op per weight
    torch.testing.assert_close(ep.module()(x), sparse(x))
    dense = dsd_fx.transform(sparse, phase="dense")
    ep = torch.export.export(dense, (x,))
    assert not [n for n in ep.graph.nodes if "dsd_fx" in str(n.target) or n.target is torch.ops.aten.mul.Tensor]
    torch.testing.assert_close(ep.module()(x), dense(x))


@pytest.mark.parametrize("make, shape", [(RecurrentNet, (2, 5, 8)), (Encoder, (2, 5, 16))], ids=["lstm", "encoder_layer"])
def test_compiled_module_call_has_no_graph_break(make, shape):
    # Dynamo skips RNN modules unless allow_rnn is set, dense or not; with it, no graph break either way
    x = torch.randn(*shape)
    with torch._dynamo.config.patch(allow_rnn=True):
        assert torch._dynamo.explain(make())(x).graph_break_count == 0
        sparse = dsd_fx.transform(make(), sparsity=0.5)
        assert torch._dynamo.explain(sparse)(x).graph_break_count == 0
        if make is RecurrentNet:  # torch 2.13's AOT autograd fails on a compiled nn.LSTM, dense or not
            return
        torch.testing.assert_close(torch.compile(sparse, backend="aot_eager")(x), sparse(x))


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("mode", list(MODES))
def test_state_dict_resume_is_bitwise_identical(mode):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)) for _ in range(4)]
    run = dsd_fx.transform(make_model(), **MODES[mode])
    opt = torch.optim.Adam(run.parameters(), lr=1e-2)
    for x, y in batches[:3]:
        _step(run, opt, x, y)
    buf = io.BytesIO()
    torch.save({"model": run.state_dict(), "opt": opt.state_dict()}, buf)
    assert "_dsd_fx._extra_state" in run.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in run.state_dict().values())  # safetensors-friendly
    expected = _step(run, opt, *batches[3])

    buf.seek(0)
    ckpt = torch.load(buf)
    fresh = make_model()
    with torch.no_grad():
        for p in fresh.parameters():  # other weights, hence other masks, before loading
            p.normal_()
    resumed = dsd_fx.transform(fresh, **MODES[mode])
    resumed.load_state_dict(ckpt["model"])
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(ckpt["opt"])
    got = _step(resumed, opt2, *batches[3])
    assert torch.equal(got, expected)
    for (name, a), b in zip(run.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "saved, loading, words",
    [
        ({"pattern": "2:4"}, {"pattern": "4:8"}, ["pattern: checkpoint '2:4', this model '4:8'"]),
        ({"sparsity": 0.5}, {"sparsity": 0.7}, ["sparsity: checkpoint 0.5, this model 0.7"]),
        ({"pattern": "2:4", "method": "sr-ste"}, {"pattern": "2:4"}, ["method: checkpoint 'sr-ste', this model 'fixed'"]),
    ],
)
def test_checkpoint_of_other_options_is_refused(saved, loading, words):
    ckpt = dsd_fx.transform(make_model(), **saved).state_dict()
    target = dsd_fx.transform(make_model(), **loading)
    with pytest.raises(ValueError) as err:
        target.load_state_dict(ckpt)
    for w in words + ["Transform a fresh model with the checkpoint's options"]:
        assert w in str(err.value), str(err.value)


@pytest.mark.parametrize("mode", list(MODES))
def test_torch_save_load_and_deepcopy_every_phase(mode, tmp_path):
    reference = torch.fx.symbolic_trace(make_model())
    x = torch.randn(3, 16)
    sparse = dsd_fx.transform(make_model(), **MODES[mode])
    for make in (lambda m: copy.deepcopy(m), lambda m: _save_load(m, tmp_path / "gm.pt")):
        loaded = make(sparse)
        torch.testing.assert_close(loaded(x), sparse(x))
        assert set(dsd_fx.current_masks(loaded)) == set(dsd_fx.current_masks(sparse))
        F.mse_loss(loaded(x), torch.zeros(3, 4)).backward()  # trains
        dense = make(dsd_fx.transform(loaded, phase="dense"))
        assert dense.code == reference.code and sorted(dense.state_dict()) == sorted(reference.state_dict())
        assert dsd_fx.verify_zero_overhead(make_model(), dense, (x,), latency_runs=2).ok


def _save_load(model, path):
    torch.save(model, path)
    return torch.load(path, weights_only=False)


# ---------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("mode", list(MODES))
def test_autocast_bf16_cpu(mode):
    sparse = dsd_fx.transform(make_model(), **MODES[mode])
    before = dsd_fx.current_masks(sparse)
    opt = torch.optim.SGD(sparse.parameters(), lr=0.05)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sparse(torch.randn(8, 16))
        assert out.dtype == torch.bfloat16
        opt.zero_grad()
        out.float().square().mean().backward()
        opt.step()
    after = dsd_fx.current_masks(sparse)
    for name, keep in after.items():
        if mode != "sr-ste":
            assert torch.equal(keep, before[name]), name  # fixed masks hold
        if mode != "mask":
            assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all(), name  # still exactly 2:4
    dense = dsd_fx.transform(sparse, phase="dense")
    assert all(p.dtype == torch.float32 for p in dense.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", list(MODES))
def test_autocast_cuda(mode, dtype):
    sparse = dsd_fx.transform(make_model().cuda(), **MODES[mode])
    with torch.autocast("cuda", dtype=dtype):
        out = sparse(torch.randn(8, 16, device="cuda"))
    out.float().sum().backward()
    dense = dsd_fx.transform(sparse, phase="dense")
    assert all(p.dtype == torch.float32 and p.is_cuda for p in dense.parameters())


def test_torch_save_load_of_a_layer_made_functional(tmp_path):
    """An LSTM's module_call survives torch.load's re-trace as one node, and re-dense restores the call."""
    sparse = dsd_fx.transform(RecurrentNet(), sparsity=0.5)
    x = torch.randn(2, 5, 8)
    loaded = _save_load(sparse, tmp_path / "lstm.pt")
    assert sum(n.target is dsd_fx.ops.module_call for n in loaded.graph.nodes) == 1
    torch.testing.assert_close(loaded(x), sparse(x))
    dense = dsd_fx.transform(loaded, phase="dense")
    assert dense.code == torch.fx.symbolic_trace(RecurrentNet()).code
