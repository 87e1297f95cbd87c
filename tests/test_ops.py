"""dsd_fx/ops.py and the kernel forms of dsd_fx/sparse/packing.py: the compressed-weight cache, the kernel
choice and its log, the packed op's gradients against the masked dense op."""
import copy
import gc
import logging

import pytest
import torch
import torch.nn.functional as F

import dsd_fx
from conftest import TinyMLP
from dsd_fx import ops
from dsd_fx.sparse.masks import nm_mask
from dsd_fx.ops import nm_linear
from dsd_fx.sparse.packing import CompressedWeights, keeps_at_most, pack_tensor, unpack_tensor


class Recorder:
    """A real compress function (unpack_tensor: the dense weight cuSPARSELt compresses from) that
    remembers the version of the values it was computed from."""

    def __init__(self) -> None:
        self.versions: list[int] = []

    def __call__(self, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        self.versions.append(values._version)
        return unpack_tensor(values.detach(), meta, 2, 4)


@pytest.fixture
def packed():
    torch.manual_seed(0)
    gm = dsd_fx.transform(TinyMLP(), pattern="2:4", pack=True)
    return gm, gm.fc1.weight_values, gm.fc1.weight_meta


def _assert_is_current(form, values, meta):
    torch.testing.assert_close(form, unpack_tensor(values.detach(), meta, 2, 4), rtol=0, atol=0)


def test_cache_recomputes_exactly_after_a_step_and_never_in_between(packed):
    gm, values, meta = packed
    record = Recorder()
    cache = CompressedWeights(record)
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(5, 8)
    forms = []
    for _ in range(3):
        for _ in range(2):  # two micro-batches of one step: forward, backward, no change of the values
            forms.append(cache.get(values, meta))
            gm(x).square().sum().backward()
            assert cache.get(values, meta) is forms[-1]
        opt.step()
        opt.zero_grad()
    assert len(record.versions) == 3  # once per optimizer step
    assert len(set(record.versions)) == 3 and forms[0] is forms[1] and forms[1] is not forms[2]
    assert cache.peek(values, meta) is None  # the last step changed the values: nothing current cached
    _assert_is_current(cache.get(values, meta), values, meta)
    assert len(record.versions) == 4


def test_cache_recomputes_after_load_state_dict_and_an_in_place_edit(packed):
    gm, values, meta = packed
    record = Recorder()
    cache = CompressedWeights(record)
    first = cache.get(values, meta)
    other = copy.deepcopy(gm)
    with torch.no_grad():
        other.fc1.weight_values.mul_(-3.0)
    gm.load_state_dict(other.state_dict())
    loaded = cache.get(values, meta)
    assert loaded is not first and len(record.versions) == 2
    _assert_is_current(loaded, values, meta)
    with torch.no_grad():
        values[0, 0] += 1.0
    edited = cache.get(values, meta)
    assert edited is not loaded
    _assert_is_current(edited, values, meta)
    assert cache.get(values, meta) is edited and len(record.versions) == 3


def test_cache_sees_a_new_meta():
    w = torch.randn(8, 16)
    values, meta = pack_tensor(w, 2, 4)
    cache = CompressedWeights(Recorder())
    before = cache.get(values, meta)
    _, other_meta = pack_tensor(torch.randn(8, 16), 2, 4)
    meta.copy_(other_meta)  # what load_state_dict does to a buffer
    after = cache.get(values, meta)
    assert after is not before
    _assert_is_current(after, values, meta)


def test_cache_forgets_a_dropped_weight_and_keeps_one_entry_per_weight():
    cache = CompressedWeights(Recorder())
    values, meta = pack_tensor(torch.randn(8, 16), 2, 4)
    cache.get(values, meta)
    values.add_(1.0)
    cache.get(values, meta)
    assert len(cache) == 1
    del values
    gc.collect()
    assert len(cache) == 0


def test_cache_never_keeps_an_inference_tensor():
    calls = []
    cache = CompressedWeights(lambda v, m: calls.append(1) or unpack_tensor(v, m, 2, 4))
    with torch.inference_mode():
        values, meta = pack_tensor(torch.randn(8, 16), 2, 4)
        cache.get(values, meta)
        cache.get(values, meta)
    assert len(calls) == 2 and len(cache) == 0


def test_keeps_at_most_tells_a_transposable_mask():
    w = torch.randn(8, 8)
    assert keeps_at_most(w * nm_mask(w, 2, 4, 1), 2, 4)
    transposable = torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    assert keeps_at_most(transposable.t(), 2, 4)
    rows_only = torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]])
    assert keeps_at_most(rows_only, 2, 4) and not keeps_at_most(rows_only.t(), 2, 4)


# ---------------------------------------------------------------- kernel choice


def _packed_call(out=8, features=16, rows=3, kernel="auto"):
    values, meta = pack_tensor(torch.randn(out, features), 2, 4)
    return nm_linear(torch.randn(rows, features), values, meta, None, 2, 4, kernel)


def test_dense_fallback_is_logged_once_per_shape(caplog):
    ops._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="dsd_fx.ops"):
        _packed_call()
        _packed_call()
        _packed_call(rows=5)  # same weight shape, other batch: no new line
        _packed_call(out=12)
    lines = [r.getMessage() for r in caplog.records if r.name == "dsd_fx.ops"]
    assert len(lines) == 2, lines
    assert "(8, 16)" in lines[0] and "(12, 16)" in lines[1]
    assert all("dense kernel" in line and "they need CUDA" in line for line in lines)


def test_dense_kernel_is_a_choice_not_a_fallback(caplog):
    ops._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="dsd_fx.ops"):
        _packed_call(kernel="dense")
    assert not [r for r in caplog.records if r.name == "dsd_fx.ops"]


def test_unknown_kernel_is_refused_by_the_op_and_its_fake():
    with pytest.raises(ValueError, match=r"impl='cuda' \(SparseConfig's kernel=\) is not one of 'auto', 'sparse', 'dense'"):
        _packed_call(kernel="cuda")
    values, meta = pack_tensor(torch.randn(8, 16), 2, 4)
    with torch._subclasses.FakeTensorMode() as mode, pytest.raises(ValueError, match="impl='x'"):
        nm_linear(mode.from_tensor(torch.randn(3, 16)), mode.from_tensor(values), mode.from_tensor(meta), None, 2, 4, "x")


def test_existing_six_argument_calls_keep_working():
    values, meta = pack_tensor(torch.randn(8, 16), 2, 4)
    x = torch.randn(3, 16)
    torch.testing.assert_close(torch.ops.dsd_fx.nm_linear.default(x, values, meta, None, 2, 4),
                               torch.ops.dsd_fx.nm_linear.default(x, values, meta, None, 2, 4, "dense"))


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("kernel", ["auto", "dense"])
@pytest.mark.parametrize("bias", [None, "1-d", "addmm"])
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_packed_gradients_equal_the_masked_dense_op_float64(kernel, bias, nm):
    n, m = nm
    torch.manual_seed(0)
    w = torch.randn(6, 2 * m, dtype=torch.float64)
    values, meta = pack_tensor(w, n, m)
    values.requires_grad_()
    x = torch.randn(2, 3, 2 * m, dtype=torch.float64, requires_grad=True)
    b = {None: None, "1-d": torch.randn(6, dtype=torch.float64), "addmm": torch.randn(3, 6, dtype=torch.float64)}[bias]
    if b is not None:
        b.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, v, b: nm_linear(x, v, meta, b, n, m, kernel), (x, values, b))
    y = nm_linear(x, values, meta, b, n, m, kernel)
    mask = nm_mask(w, n, m, 1)
    wd = (w * mask).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    b2 = None if b is None else b.detach().clone().requires_grad_()
    y2 = F.linear(x2, wd) + (0 if b2 is None else b2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(y, y2, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(unpack_tensor(values.grad, meta, n, m), wd.grad * mask, rtol=0, atol=1e-12)
    if b is not None:
        torch.testing.assert_close(b.grad, b2.grad, rtol=0, atol=1e-12)


def test_nm_linear_with_a_kernel_compiles_without_a_break():
    torch._dynamo.reset()
    values, meta = pack_tensor(torch.randn(8, 16), 2, 4)
    x = torch.randn(4, 16)

    def f(x, values):
        return nm_linear(x, values, meta, None, 2, 4, "dense").relu()

    assert torch._dynamo.explain(f)(x, values).graph_break_count == 0
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x, values), f(x, values))


# ---------------------------------------------------------------- CUDA (never faked: skipped without one)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_sparse_kernel_compresses_once_per_optimizer_step(dtype):
    torch.manual_seed(0)
    w = torch.randn(256, 512, device="cuda", dtype=dtype)
    values, meta = pack_tensor(w, 2, 4)
    values = torch.nn.Parameter(values)
    x = torch.randn(64, 512, device="cuda", dtype=dtype)
    opt = torch.optim.SGD([values], lr=1e-3)
    seen = []
    for _ in range(2):
        for _ in range(2):  # forward and backward of two micro-batches share one compression
            nm_linear(x, values, meta, None, 2, 4, "sparse").float().square().mean().backward()
            seen.append(ops.SEMI_STRUCTURED.peek(values, meta))
        opt.step()
    assert all(s is not None for s in seen)
    assert seen[0] is seen[1] and seen[2] is seen[3] and seen[1] is not seen[2]
    assert ops.SEMI_STRUCTURED.peek(values, meta) is None  # stale after the last step until the next call


@cuda
@pytest.mark.parametrize("kernel", ["sparse", "auto"])
def test_cuda_packed_gradients_match_the_masked_dense_op(kernel):
    torch.manual_seed(0)
    w = torch.randn(256, 512, device="cuda", dtype=torch.float16)
    x = torch.randn(2, 32, 512, device="cuda", dtype=torch.float16, requires_grad=True)
    values, meta = pack_tensor(w, 2, 4)
    values.requires_grad_()
    y = nm_linear(x, values, meta, None, 2, 4, kernel)
    mask = nm_mask(w, 2, 4, 1)
    wd = (w * mask).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y2 = F.linear(x2, wd)
    torch.testing.assert_close(y, y2, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(unpack_tensor(values.grad, meta, 2, 4), wd.grad * mask, rtol=2e-2, atol=2e-1)


@cuda
def test_cuda_dense_kernel_compresses_nothing():
    w = torch.randn(128, 256, device="cuda", dtype=torch.float16)
    values, meta = pack_tensor(w, 2, 4)
    x = torch.randn(32, 256, device="cuda", dtype=torch.float16)
    y = nm_linear(x, values, meta, None, 2, 4, "dense")
    assert ops.SEMI_STRUCTURED.peek(values, meta) is None
    torch.testing.assert_close(y, F.linear(x, w * nm_mask(w, 2, 4, 1)), rtol=1e-2, atol=1e-2)


@cuda
def test_cuda_transposable_mask_runs_the_input_gradient_sparse():
    torch.manual_seed(0)
    block = torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    mask = block.repeat(64, 128).cuda().half()  # (256, 512), 2:4 along rows and along columns
    w = torch.randn(256, 512, device="cuda", dtype=torch.float16) * mask
    values, meta = pack_tensor(w, 2, 4)
    values.requires_grad_()
    x = torch.randn(64, 512, device="cuda", dtype=torch.float16, requires_grad=True)
    nm_linear(x, values, meta, None, 2, 4, "sparse").backward(torch.ones(64, 256, device="cuda", dtype=torch.float16))
    forms = ops.SEMI_STRUCTURED.peek(values, meta)
    assert forms is not None and forms.transposed is not None
    torch.testing.assert_close(x.grad, torch.ones(64, 256, device="cuda", dtype=torch.float16) @ w, rtol=2e-2, atol=2e-1)
