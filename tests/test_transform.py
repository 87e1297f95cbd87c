import copy

import pytest
import torch
import torch.nn as nn
from torch import fx

import dsd_fx
from conftest import TinyCNN, TinyMLP, assert_unchanged, isomorphic, masked_reference, snapshot

SPARSE_MLP = '''
def forward(self, x):
    fc1_weight = self.fc1.weight
    fc1_weight_mask = self.fc1.weight_mask
    mask_mul = dsd_fx_ops_mask_mul(fc1_weight, fc1_weight_mask, grad_inplace = True);  fc1_weight = fc1_weight_mask = None
    fc1_bias = self.fc1.bias
    linear = torch._C._nn.linear(x, mask_mul, fc1_bias);  x = mask_mul = fc1_bias = None
    relu = torch.relu(linear);  linear = None
    fc2_weight = self.fc2.weight
    fc2_weight_mask = self.fc2.weight_mask
    mask_mul_1 = dsd_fx_ops_mask_mul(fc2_weight, fc2_weight_mask, grad_inplace = True);  fc2_weight = fc2_weight_mask = None
    fc2_bias = self.fc2.bias
    linear_1 = torch._C._nn.linear(relu, mask_mul_1, fc2_bias);  relu = mask_mul_1 = fc2_bias = None
    return linear_1
'''

DENSE_MLP = '''
def forward(self, x):
    fc1 = self.fc1(x);  x = None
    relu = torch.relu(fc1);  fc1 = None
    fc2 = self.fc2(relu);  relu = None
    return fc2
'''


def test_golden_sparse_and_dense_code():
    sparse = dsd_fx.transform(TinyMLP(), phase="sparse", sparsity=0.5)
    assert sparse.code.strip() == SPARSE_MLP.strip()
    dense = dsd_fx.transform(sparse, phase="dense")
    assert dense.code.strip() == DENSE_MLP.strip()


def _masks(gm):
    return {k[: -len("_mask")]: v for k, v in gm.named_buffers() if k.endswith("_mask")}


def test_sparse_output_equals_masked_model(zoo):
    model, args = zoo
    original = copy.deepcopy(model)
    sparse = dsd_fx.transform(model, sparsity=0.6)
    ref = masked_reference(original, _masks(sparse))
    torch.testing.assert_close(sparse(*args), ref(*args))


def test_exact_sparsity_per_layer(zoo):
    model, _ = zoo
    shapes = {n: p.numel() for n, p in model.named_parameters() if p.dim() >= 2}
    sparse = dsd_fx.transform(model, sparsity=0.3)
    masks = _masks(sparse)
    assert set(masks) == set(shapes)  # every >=2-D weight of these models is a matmul weight
    for name, mask in masks.items():
        assert int((mask == 0).sum()) == round(0.3 * shapes[name]), name
        # the pruned weights are zero in storage from the start of the S phase
        assert bool((model.get_parameter(name)[mask == 0] == 0).all())


def test_biases_and_1d_parameters_are_not_pruned():
    sparse = dsd_fx.transform(TinyCNN(), sparsity=0.5)
    assert not any("bias" in k for k in _masks(sparse))


def test_parameters_are_shared_unless_copied():
    model = TinyMLP()
    sparse = dsd_fx.transform(model)
    assert sparse.fc1.weight is model.fc1.weight
    assert "weight_mask" not in dict(model.fc1.named_buffers())  # the user's module keeps its shape
    other = TinyMLP()
    before = other.fc1.weight.detach().clone()
    copied = dsd_fx.transform(other, copy=True)
    assert copied.fc1.weight is not other.fc1.weight
    torch.testing.assert_close(other.fc1.weight.detach(), before, rtol=0, atol=0)


OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_s_phase_holds_through_training(zoo, opt):
    model, args = zoo
    sparse = dsd_fx.transform(model, sparsity=0.5)
    masks = _masks(sparse)
    optimizer = OPTIMIZERS[opt](sparse.parameters())
    for step in range(5):
        optimizer.zero_grad()
        out = sparse(*args)
        loss = sum(o.square().mean() for o in (out if isinstance(out, tuple) else (out,)))
        loss.backward()
        for name, mask in masks.items():
            grad = sparse.get_parameter(name).grad
            assert bool((grad[mask == 0] == 0).all()), f"{name} pruned weights got gradient at step {step}"
        optimizer.step()
    for name, mask in masks.items():
        assert bool((sparse.get_parameter(name)[mask == 0] == 0).all()), f"{name} pruned weights moved under {opt}"
    # and they have no effect on the output: perturbing them changes nothing
    with torch.no_grad():
        before = sparse(*args)
        for name, mask in masks.items():
            sparse.get_parameter(name).add_((1 - mask) * 100.0)
        after = sparse(*args)
    for b, a in zip(before if isinstance(before, tuple) else (before,), after if isinstance(after, tuple) else (after,)):
        torch.testing.assert_close(a, b)


def test_stale_optimizer_state_cannot_revive_pruned_weights():
    """Momentum built in the dense phase keeps moving pruned weights; they must stay without effect."""
    model = TinyMLP()
    x = torch.randn(4, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).sum().backward()
    opt.step()  # dense-phase momentum for every weight
    sparse = dsd_fx.transform(model, sparsity=0.5)
    mask = sparse.fc1.weight_mask
    opt.zero_grad()
    sparse(x).sum().backward()
    assert bool((model.fc1.weight.grad[mask == 0] == 0).all())
    opt.step()  # the stale momentum moves the pruned weights...
    assert bool((model.fc1.weight[mask == 0] != 0).any())
    reference = masked_reference(model, {"fc1.weight": mask, "fc2.weight": sparse.fc2.weight_mask})
    torch.testing.assert_close(sparse(x), reference(x))  # ...but they have no effect
    assert bool((model.fc1.weight[mask == 0] == 0).all())  # and the mask op put them back to zero


def test_mask_mul_gradient_is_masked_and_value_exact():
    from dsd_fx.ops import mask_mul

    w = torch.nn.Parameter(torch.randn(6, 5))
    m = (torch.rand(6, 5) > 0.5).float()
    expected = (w.detach() * m).clone()
    out = mask_mul(w, m)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    g = torch.randn(6, 5)
    out.backward(g)
    torch.testing.assert_close(w.grad, g * m, rtol=0, atol=0)


def test_redense_restores_graph_and_state_dict(zoo):
    model, args = zoo
    traced = fx.symbolic_trace(copy.deepcopy(model))
    sparse = dsd_fx.transform(model, sparsity=0.5)
    with torch.no_grad():  # some optimizer drift into pruned weights: re-dense must zero it
        for p in sparse.parameters():
            p.add_(0.01)
    masks = {k: v.clone() for k, v in _masks(sparse).items()}
    expected = {k: (sparse.get_parameter(k) * m).detach().clone() for k, m in masks.items()}
    dense = dsd_fx.transform(sparse, phase="dense")
    assert isomorphic(dense, traced)
    assert dense.code == traced.code
    assert set(dense.state_dict()) == set(type(model)().state_dict())
    assert not any("dsd_fx" in n.meta for n in dense.graph.nodes)
    for name, value in expected.items():
        torch.testing.assert_close(dense.get_parameter(name), value, rtol=0, atol=0)
        assert bool((dense.get_parameter(name)[masks[name] == 0] == 0).all())
    fresh = type(model)()
    fresh.load_state_dict(dense.state_dict())  # strict: same keys
    torch.testing.assert_close(fresh(*args), dense(*args))


def test_redense_graph_is_trainable_dense():
    model = TinyMLP()
    dense = dsd_fx.transform(dsd_fx.transform(model), phase="dense")
    dense(torch.randn(3, 8)).sum().backward()
    assert bool((model.fc1.weight.grad != 0).any())  # pruned positions now receive gradient
    zero = model.fc1.weight == 0
    assert bool((model.fc1.weight.grad[zero] != 0).any())


def test_graphmodule_from_another_tracer():
    class LeafTracer(fx.Tracer):
        def is_leaf_module(self, m, name):
            return name == "block" or super().is_leaf_module(m, name)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.block(x))

    model = Model()
    gm = fx.GraphModule(model, LeafTracer().trace(model))
    sparse = dsd_fx.transform(gm, sparsity=0.5)
    # the leaf's inside is not in the graph; its Linear is masked through a functional call of the leaf
    assert [n for n, _ in sparse.named_buffers() if n.endswith("_mask")] == ["block.0.weight_mask", "head.weight_mask"]
    assert "module_call" in sparse.code and "self.block(x)" not in sparse.code
    x = torch.randn(3, 4)
    expected = model.head(model.block(x))  # the commit zeroed the pruned weights in place
    assert float((model.block[0].weight == 0).float().mean()) == 0.5
    torch.testing.assert_close(sparse(x), expected)
    dense = dsd_fx.transform(sparse, phase="dense")
    assert dense.code == gm.code


def test_sparsity_mapping_include_exclude_global():
    model = TinyCNN()
    sparse = dsd_fx.transform(model, sparsity={"conv*": 0.25, "head": 0.5})
    masks = _masks(sparse)
    assert set(masks) == {"conv1.weight", "conv2.weight", "head.weight"}
    assert int((masks["head.weight"] == 0).sum()) == round(0.5 * 12)
    sparse = dsd_fx.transform(TinyCNN(), include=["conv*", "up"], exclude=lambda w: w.layer == "conv2")
    assert set(_masks(sparse)) == {"conv1.weight", "up.weight"}
    sparse = dsd_fx.transform(TinyCNN(), sparsity=0.5, scope="global")
    masks = _masks(sparse)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((m == 0).sum()) for m in masks.values()) == round(0.5 * total)
    assert len({round(float((m == 0).float().mean()), 3) for m in masks.values()}) > 1  # not per layer


def test_dsdsd_cycle():
    model = TinyMLP()
    d1 = dsd_fx.transform(dsd_fx.transform(model), phase="dense")
    s2 = dsd_fx.transform(d1, sparsity=0.5)
    d2 = dsd_fx.transform(s2, phase="dense")
    assert d2.code.strip() == DENSE_MLP.strip()


def test_failed_transform_leaves_model_unchanged():
    model = TinyMLP()
    snap = snapshot(model)
    with pytest.raises(ValueError):
        dsd_fx.transform(model, sparsity={"fc*": 0.5, "nothing": 0.1})
    assert_unchanged(model, snap)


def test_gradients_equal_masked_reference_with_shared_reads():
    """A weight read by a matmul and by other ops at once: gradients must still be exact."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 6))
            self.v = nn.Parameter(torch.randn(6, 6))

        def forward(self, x):
            w = self.w
            y = x @ w + w.sum() + torch.matmul(x, self.v)
            return y + (w * 2).mean(), self.v.t()

    torch.manual_seed(0)
    model = Shared()
    x = torch.randn(3, 6)
    sparse = dsd_fx.transform(copy.deepcopy(model), sparsity=0.5)
    masks = _masks(sparse)
    assert "grad_inplace" not in sparse.code.split("w_mask")[1].split("\n")[0]  # w has several readers

    class Reference(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(model.w.detach() * masks["w"])
            self.v = nn.Parameter(model.v.detach() * masks["v"])

        def forward(self, x):
            w, v = self.w * masks["w"], self.v * masks["v"]
            y = x @ w + w.sum() + torch.matmul(x, v)
            return y + (w * 2).mean(), v.t()

    ref = Reference()
    for net in (sparse, ref):
        a, b = net(x)
        (a.square().sum() + b.sum()).backward()
    torch.testing.assert_close(sparse.w.grad, ref.w.grad)
    torch.testing.assert_close(sparse.v.grad, ref.v.grad)


def test_magnitude_graph_exports_and_compiles():
    """mask_mul is a plain W * M under torch.export and torch.compile: one Mul per weight, no graph break."""
    sparse = dsd_fx.transform(TinyMLP())
    x = torch.randn(3, 8)
    ep = torch.export.export(sparse, (x,))
    assert sum(n.target is torch.ops.aten.mul.Tensor for n in ep.graph.nodes) == 2
    assert torch._dynamo.explain(sparse)(x).graph_break_count == 0
    torch.testing.assert_close(torch.compile(sparse, backend="aot_eager")(x), sparse(x))
