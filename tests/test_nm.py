"""N:M masks, SR-STE, packed N:M ops, SAD: properties against independent reference code."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dsd_fx
from conftest import TinyCNN, TinyMLP, assert_rejected, assert_unchanged, isomorphic, snapshot
from dsd_fx.sparse.masks import nm_mask, parse_pattern
from dsd_fx.ops import nm_linear, nm_unpack
from dsd_fx.sparse.packing import pack_tensor, unpack_tensor

PATTERNS = st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (1, 3)])


def reference_nm_mask(w: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Plain loops: along `dim`, in every run of m, keep the n largest |w| (lowest index on ties)."""
    moved = w.movedim(dim, -1).contiguous()
    flat = moved.reshape(-1, moved.shape[-1]).tolist()
    out = []
    for row in flat:
        keep = [0.0] * len(row)
        for start in range(0, len(row), m):
            group = list(range(start, start + m))
            for i in sorted(group, key=lambda i: (-abs(row[i]), i))[:n]:
                keep[i] = 1.0
        out.append(keep)
    return torch.tensor(out, dtype=w.dtype).view(moved.shape).movedim(-1, dim)


def _weight(draw, kind, m):
    groups = draw(st.integers(1, 3))
    red = groups * m
    if kind == "linear":  # (out, in), reduce along in
        return torch.randn(draw(st.integers(1, 5)), red), 1
    if kind == "conv":  # (out, in, kh, kw), reduce along in at each kernel position
        return torch.randn(draw(st.integers(1, 4)), red, draw(st.integers(1, 3)), draw(st.integers(1, 3))), 1
    return torch.randn(red, draw(st.integers(1, 5))), 0  # (in, out) used through addmm: reduce along dim 0


@settings(max_examples=60, deadline=None)
@given(data=st.data(), nm=PATTERNS, kind=st.sampled_from(["linear", "conv", "in_out"]), ties=st.booleans())
def test_nm_mask_keeps_exactly_n_per_group(data, nm, kind, ties):
    n, m = nm
    w, dim = _weight(data.draw, kind, m)
    if ties:
        w = torch.randint(-2, 3, w.shape).float()
    mask = nm_mask(w, n, m, dim)
    counts = mask.movedim(dim, -1).reshape(-1, m).sum(1)
    assert bool((counts == n).all())
    torch.testing.assert_close(mask, reference_nm_mask(w, n, m, dim), rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), nm=PATTERNS, kind=st.sampled_from(["linear", "conv", "in_out"]))
def test_pack_then_unpack_is_exact(data, nm, kind):
    n, m = nm
    w, dim = _weight(data.draw, kind, m)
    values, meta = pack_tensor(w, n, m, dim)
    assert values.numel() == w.numel() * n // m
    assert meta.dtype == torch.uint8 and meta.numel() == math.ceil(values.numel() * max(1, math.ceil(math.log2(m))) / 8)
    dense = unpack_tensor(values, meta, n, m, dim).reshape(w.shape)
    torch.testing.assert_close(dense, w * reference_nm_mask(w, n, m, dim), rtol=0, atol=0)


def test_packed_bytes_2_4_fp32():
    w = torch.randn(256, 256)
    values, meta = pack_tensor(w, 2, 4)
    ratio = (values.numel() * values.element_size() + meta.numel()) / (w.numel() * 4)
    assert ratio == pytest.approx(0.53125)


@settings(max_examples=40, deadline=None)
@given(
    nm=st.sampled_from([(2, 4), (1, 4), (4, 8)]),
    out=st.integers(1, 6),
    groups=st.integers(1, 3),
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    bias=st.booleans(),
)
def test_packed_linear_equals_masked_dense(nm, out, groups, lead, bias):
    n, m = nm
    w = torch.randn(out, groups * m)
    x = torch.randn(*lead, groups * m, requires_grad=True)
    b = torch.randn(out, requires_grad=True) if bias else None
    values, meta = pack_tensor(w, n, m)
    values.requires_grad_()
    y = nm_linear(x, values, meta, b, n, m)
    mask = reference_nm_mask(w, n, m, 1)
    wd = (w * mask).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_() if bias else None
    y2 = F.linear(x2, wd, b2)
    torch.testing.assert_close(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    # the values' gradient is the dense weight gradient at the kept positions
    torch.testing.assert_close(unpack_tensor(values.grad, meta, n, m), wd.grad * mask)
    if bias:
        torch.testing.assert_close(b.grad, b2.grad)


def test_nm_unpack_gradient_for_conv_storage():
    w = torch.randn(4, 8, 3, 3)
    values, meta = pack_tensor(w, 2, 4, 1)
    values.requires_grad_()
    dense = nm_unpack(values, meta, 2, 4, 1, list(w.shape))
    g = torch.randn_like(dense)
    dense.backward(g)
    mask = reference_nm_mask(w, 2, 4, 1)
    torch.testing.assert_close(dense, w * mask)
    torch.testing.assert_close(unpack_tensor(values.grad, meta, 2, 4, 1).reshape(w.shape), g * mask)


def test_custom_ops_pass_opcheck():
    w = torch.randn(8, 16)
    values, meta = pack_tensor(w, 2, 4)
    torch.library.opcheck(torch.ops.dsd_fx.nm_linear.default, (torch.randn(3, 16), values, meta, torch.randn(8), 2, 4))
    torch.library.opcheck(torch.ops.dsd_fx.nm_linear.default, (torch.randn(3, 16), values, meta, None, 2, 4, "dense"))
    torch.library.opcheck(torch.ops.dsd_fx.sparsify_nm.default, (w.requires_grad_(), 2, 4, 1, 2e-4))
    torch.library.opcheck(torch.ops.dsd_fx.nm_unpack.default, (values, meta, 2, 4, 1, [8, 16]))


@pytest.mark.parametrize("method, lam", [("sr-ste", 2e-4), ("sr-ste", 0.05), ("ste", None)])
def test_sr_ste_gradient_is_the_formula(method, lam):
    torch.manual_seed(0)
    model = TinyMLP()
    x = torch.randn(5, 8)
    kwargs = {"lambda_w": lam} if lam is not None else {}
    sparse = dsd_fx.transform(copy.deepcopy(model), pattern="2:4", method=method, **kwargs)
    sparse(x).square().sum().backward()
    lam_eff = 0.0 if method == "ste" else lam
    # independently: W~ = W * M as leaves, their gradient, then STE + the sparse-refined term
    w1, w2 = model.fc1.weight.detach(), model.fc2.weight.detach()
    m1, m2 = reference_nm_mask(w1, 2, 4, 1), reference_nm_mask(w2, 2, 4, 1)
    t1, t2 = (w1 * m1).requires_grad_(), (w2 * m2).requires_grad_()
    F.linear(torch.relu(F.linear(x, t1, model.fc1.bias)), t2, model.fc2.bias).square().sum().backward()
    torch.testing.assert_close(sparse.fc1.weight.grad, t1.grad + lam_eff * (1 - m1) * w1)
    torch.testing.assert_close(sparse.fc2.weight.grad, t2.grad + lam_eff * (1 - m2) * w2)
    assert bool((sparse.fc1.weight.grad[m1 == 0] != 0).any())  # STE: pruned weights do get gradient


def test_sparse_graph_uses_one_op_per_weight():
    sparse = dsd_fx.transform(TinyMLP(), pattern="2:4", method="sr-ste")
    ops = [n for n in sparse.graph.nodes if n.target is torch.ops.dsd_fx.sparsify_nm.default]
    assert len(ops) == 2 and "torch.ops.dsd_fx.sparsify_nm.default(fc1_weight, 2, 4, 1, 0.0002, True)" in sparse.code
    packed = dsd_fx.transform(TinyMLP(), pattern="2:4", pack=True)
    assert sum(n.target is torch.ops.dsd_fx.nm_linear.default for n in packed.graph.nodes) == 2


def _train(gm, x, steps=8, lr=0.5):
    opt = torch.optim.SGD(gm.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        out = gm(*x)
        sum(o.square().mean() for o in (out if isinstance(out, tuple) else (out,))).backward()
        opt.step()


def test_fixed_mask_never_changes_and_sr_ste_does_with_sad():
    torch.manual_seed(0)
    x = (torch.randn(16, 8),)
    fixed = dsd_fx.transform(TinyMLP(), pattern="2:4")
    tracker = dsd_fx.SADTracker(fixed, every=2)
    start = dsd_fx.current_masks(fixed)
    for _ in range(4):
        _train(fixed, x, steps=1)
        tracker.step()
    assert dsd_fx.sad(start, dsd_fx.current_masks(fixed)).changed == 0
    assert len(tracker.history) == 2 and all(h[2].changed == 0 for h in tracker.history)

    torch.manual_seed(0)
    dynamic = dsd_fx.transform(TinyMLP(), pattern="2:4", method="sr-ste", lambda_w=0.0)
    tracker = dsd_fx.SADTracker(dynamic)
    start = {k: v.clone() for k, v in dsd_fx.current_masks(dynamic).items()}
    for _ in range(6):
        _train(dynamic, x, steps=1, lr=2.0)
        tracker.step()
    end = dsd_fx.current_masks(dynamic)
    # SAD independently: count of positions whose kept state differs
    expected = sum(int((start[k] != end[k]).sum()) for k in start)
    result = dsd_fx.sad(start, end)
    assert expected > 0 and result.changed == expected
    assert result.total == sum(v.numel() for v in start.values())
    assert tracker.history[-1][2].changed == expected
    for name, mask in end.items():  # still N:M after training
        assert bool((mask.reshape(-1, 4).sum(1) == 2).all())


MODES = {
    "fixed": {"pattern": "2:4"},
    "sr-ste": {"pattern": "2:4", "method": "sr-ste"},
    "packed": {"pattern": "2:4", "pack": True},
    "4:8": {"pattern": "4:8"},
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_trains_and_redenses_to_the_original(zoo, mode):
    model, args = zoo
    reference = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some zoo layers are not divisible by M; tested below
        sparse = dsd_fx.transform(model, **MODES[mode])
    masks = dsd_fx.current_masks(sparse)
    # the sparse graph computes with W * M: compare against an independent masked copy
    masked = copy.deepcopy(reference)
    with torch.no_grad():
        for name, mask in masks.items():
            masked.get_parameter(name).mul_(mask)
    if mode != "sr-ste":  # (sr-ste keeps dense weights; its mask equals nm_mask of them, same thing)
        for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (sparse(*args), masked(*args)))):
            torch.testing.assert_close(a, b)
    _train(sparse, args, steps=2, lr=0.05)
    final_masks = {k: v.clone() for k, v in dsd_fx.current_masks(sparse).items()}
    dense = dsd_fx.transform(sparse, phase="dense")
    assert dense.code == traced.code and isomorphic(dense, traced)
    assert set(dense.state_dict()) == set(reference.state_dict())
    for name, mask in final_masks.items():
        w = dense.get_parameter(name)
        assert w.shape == mask.shape and bool((w[~mask] == 0).all()), name
    fresh = type(reference)()
    fresh.load_state_dict(dense.state_dict())
    report = dsd_fx.verify_zero_overhead(reference, dense, args, latency_runs=2)
    assert report.ok, report.table


def test_pack_frees_the_dense_weight_and_redense_restores_the_same_parameter():
    model = TinyMLP()
    weight = model.fc1.weight
    expected = (weight.detach() * reference_nm_mask(weight.detach(), 2, 4, 1)).clone()
    sparse = dsd_fx.transform(model, pattern="2:4", pack=True)
    assert weight.numel() == 0  # no dense copy is kept alive
    keys = set(sparse.state_dict())
    assert {"fc1.weight_values", "fc1.weight_meta"} <= keys and "fc1.weight" not in keys
    assert sparse.fc1.weight_values.shape == (16, 4) and sparse.fc1.weight_values.requires_grad
    dense = dsd_fx.transform(sparse, phase="dense")
    assert dense.fc1.weight is weight and model.fc1.weight is weight
    torch.testing.assert_close(weight.detach(), expected, rtol=0, atol=0)


def test_non_divisible_layers_warn_once_or_raise_when_strict():
    model = TinyCNN()
    with pytest.warns(UserWarning) as record:
        sparse = dsd_fx.transform(copy.deepcopy(model), pattern="2:4")
    texts = [str(r.message) for r in record if "dsd_fx" in str(r.message)]
    assert len(texts) == 1 and "conv1.weight (3)" in texts[0] and "c3d.weight (1)" in texts[0] and "t3d.weight (2)" in texts[0]
    assert "conv1.weight" not in dsd_fx.current_masks(sparse)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="layer 'conv1' has 3.*strict=False"):
        dsd_fx.transform(model, pattern="2:4", strict=True)
    assert_unchanged(model, snap)


def test_conv_groups_run_along_input_channels_per_kernel_position():
    conv = nn.Conv2d(8, 2, 3)
    sparse = dsd_fx.transform(nn.Sequential(conv), pattern="2:4")
    mask = sparse.get_buffer("0.weight_mask")
    per_position = mask.permute(0, 2, 3, 1).reshape(-1, 4).sum(1)  # (out, kh, kw, in) groups
    assert bool((per_position == 2).all())


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"pattern": "2-4"}, ValueError, ["'2-4'", "'N:M'"]),
        ({"pattern": "4:4"}, ValueError, ["1 <= N < M", "N=4"]),
        ({"pattern": "0:4"}, ValueError, ["1 <= N < M", "N=0"]),
        ({"pattern": "2:4", "lambda_w": -1e-3}, ValueError, ["lambda_w", "-0.001"]),
        ({"pack": True, "sparsity": 0.5}, ValueError, ["pack=True", "pattern"]),
        ({"method": "sr-ste"}, ValueError, ["method='sr-ste'", "pattern="]),
        ({"pattern": "2:4", "method": "sr-ste", "pack": True}, ValueError, ["method='fixed'"]),
        ({"pattern": "2:4", "method": "srste"}, ValueError, ["'srste'", "sr-ste"]),
        ({"pattern": "2:4", "sparsity": 0.3}, ValueError, ["drop sparsity"]),
        ({"pattern": 24}, TypeError, ["'N:M'"]),
    ],
)
def test_bad_nm_options(kwargs, exc, words):
    assert_rejected(kwargs, exc, words)


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern("1:8") == (1, 8)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_packed_linear_uses_semi_structured_kernels(dtype):
    from dsd_fx import ops

    torch.manual_seed(0)
    w = torch.randn(256, 512, device="cuda", dtype=dtype)
    x = torch.randn(64, 512, device="cuda", dtype=dtype, requires_grad=True)
    values, meta = pack_tensor(w, 2, 4)
    values.requires_grad_()
    y = nm_linear(x, values, meta, None, 2, 4, "sparse")
    forms = ops.SEMI_STRUCTURED.peek(values, meta)  # the compressed weight the sparse kernel ran on
    assert forms is not None and isinstance(forms.weight, torch.sparse.SparseSemiStructuredTensor)
    wd = (w * nm_mask(w, 2, 4, 1)).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y2 = F.linear(x2, wd)
    torch.testing.assert_close(y, y2, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(unpack_tensor(values.grad, meta, 2, 4), wd.grad * nm_mask(w, 2, 4, 1), rtol=2e-2, atol=2e-1)


@cuda
def test_cutlass_weight_matches_torchs_own_conversion():
    from dsd_fx.sparse.packing import cutlass_weight
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    w = torch.randn(128, 256, device="cuda", dtype=torch.float16)
    dense = w * nm_mask(w, 2, 4, 1)
    values, meta = pack_tensor(w, 2, 4)
    ours = cutlass_weight(values, meta, 128, 256)
    packed, meta_ref = sparse_semi_structured_from_dense_cutlass(dense)
    torch.testing.assert_close(ours.packed, packed, rtol=0, atol=0)
    torch.testing.assert_close(ours.meta, meta_ref, rtol=0, atol=0)
    torch.testing.assert_close(ours.to_dense(), dense, rtol=0, atol=0)


@cuda
def test_cuda_transform_every_mode():
    for kwargs in MODES.values():
        model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64)).cuda().half()
        sparse = dsd_fx.transform(model, **kwargs)
        x = torch.randn(32, 128, device="cuda", dtype=torch.half)
        sparse(x).float().square().mean().backward()
        dense = dsd_fx.transform(sparse, phase="dense")
        weight = dense.get_parameter("0.weight")
        assert weight.dtype == torch.half and weight.is_cuda and weight.shape == (256, 128)


@pytest.mark.parametrize("mode", ["sr-ste", "packed"])
def test_export_and_compile_see_one_op(mode):
    """torch.export keeps each dsd_fx custom op as one node; torch.compile runs it without a graph break."""
    torch.manual_seed(0)
    sparse = dsd_fx.transform(TinyMLP(), **MODES[mode])
    x = torch.randn(4, 8)
    op = torch.ops.dsd_fx.sparsify_nm.default if mode == "sr-ste" else torch.ops.dsd_fx.nm_linear.default
    ep = torch.export.export(sparse, (x,))
    assert sum(n.target is op for n in ep.graph.nodes) == 2
    explained = torch._dynamo.explain(sparse)(x)
    assert explained.graph_break_count == 0
    compiled = torch.compile(sparse, backend="aot_eager")
    torch.testing.assert_close(compiled(x), sparse(x))


def _sr_ste_reference_grad(w, x, lam):
    mask = reference_nm_mask(w.detach(), 2, 4, 1)
    t = (w.detach() * mask).requires_grad_()
    F.linear(x, t).square().sum().backward()
    return t.grad + lam * (1 - mask) * w.detach()


@pytest.mark.parametrize("reuse_output", [False, True])
@pytest.mark.parametrize("how", ["plain", "retain_graph twice", "create_graph", "weight used twice", "compiled"])
def test_sr_ste_backward_is_the_formula_however_it_runs(how, reuse_output):
    """reuse_output lets the backward write into W~'s storage when nothing reads W~ again: every way of running it."""
    torch.manual_seed(0)
    lam = 0.05
    w = torch.randn(6, 8, requires_grad=True)
    x = torch.randn(5, 8)
    op = torch.ops.dsd_fx.sparsify_nm.default

    def loss(x):
        sparse = op(w, 2, 4, 1, lam, reuse_output)
        return F.linear(x, sparse).square().sum()

    if how == "plain":
        loss(x).backward()
        torch.testing.assert_close(w.grad, _sr_ste_reference_grad(w, x, lam))
    elif how == "retain_graph twice":
        out = loss(x)
        out.backward(retain_graph=True)
        out.backward()
        torch.testing.assert_close(w.grad, 2 * _sr_ste_reference_grad(w, x, lam))
    elif how == "create_graph":
        (g,) = torch.autograd.grad(loss(x), w, create_graph=True)
        torch.testing.assert_close(g, _sr_ste_reference_grad(w, x, lam))
    elif how == "weight used twice":  # W~ feeds two matmuls: both backwards run before SR-STE's
        sparse = op(w, 2, 4, 1, lam, reuse_output)
        (F.linear(x, sparse).square().sum() + F.linear(x, sparse).square().sum()).backward()
        torch.testing.assert_close(w.grad, 2 * _sr_ste_reference_grad(w, x, lam) - lam * (1 - reference_nm_mask(w.detach(), 2, 4, 1)) * w.detach())
    else:
        torch._dynamo.reset()
        torch.compile(loss, fullgraph=True, backend="aot_eager")(x).backward()
        torch.testing.assert_close(w.grad, _sr_ste_reference_grad(w, x, lam))


def test_sr_ste_reuse_output_writes_the_gradient_into_w_tilde_only_when_asked():
    w = torch.randn(6, 8, requires_grad=True)
    x = torch.randn(5, 8)
    for reuse, expect_same in ((False, False), (True, True)):
        w.grad = None
        sparse = torch.ops.dsd_fx.sparsify_nm.default(w, 2, 4, 1, 0.05, reuse)
        ptr = sparse.data_ptr()
        F.linear(x, sparse).square().sum().backward()
        assert (w.grad.data_ptr() == ptr) is expect_same
