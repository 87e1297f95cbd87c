"""Bad input: a clear error naming the layer, the value and the fix, and the model left as it was."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import dsd_fx
from conftest import TinyMLP, assert_rejected, assert_unchanged, snapshot


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"sparsity": 1.0}, ValueError, ["[0, 1)", "1.0"]),
        ({"sparsity": -0.1}, ValueError, ["[0, 1)", "-0.1"]),
        ({"sparsity": float("nan")}, ValueError, ["[0, 1)"]),
        ({"sparsity": "half"}, TypeError, ["'half'"]),
        ({"sparsity": {"fc1": 1.5}}, ValueError, ["sparsity['fc1']", "1.5"]),
        ({"phase": "medium"}, ValueError, ["'medium'", "phase='sparse'", "phase='dense'"]),
        ({"include": ["encoder.*"]}, ValueError, ["'encoder.*'", "fc1.weight", "fc2.weight"]),
        ({"exclude": ["fc3"]}, ValueError, ["'fc3'", "Did you mean", "fc1"]),
        ({"sparsity": {"fc9": 0.5}}, ValueError, ["'fc9'", "fc1.weight"]),
        ({"include": ["fc1"], "exclude": ["fc1"]}, ValueError, ["no weight to prune", "fc1.weight"]),
        ({"scope": "model"}, ValueError, ["'model'", "layer", "global"]),
        ({"scope": "global", "sparsity": {"fc1": 0.5}}, ValueError, ["global", "scope='layer'"]),
    ],
)
def test_bad_options(kwargs, exc, words):
    assert_rejected(kwargs, exc, words)


def test_model_without_prunable_weight():
    model = nn.Sequential(nn.ReLU(), nn.LayerNorm(4))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="no prunable weight"):
        dsd_fx.transform(model)
    assert_unchanged(model, snap)


def test_redense_without_dsd_nodes():
    model = TinyMLP()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="nothing to re-dense"):
        dsd_fx.transform(model, phase="dense")
    gm = torch.fx.symbolic_trace(model)
    with pytest.raises(ValueError, match="phase='sparse'"):
        dsd_fx.transform(gm, phase="dense")
    assert_unchanged(model, snap)


def test_second_sparse_transform():
    sparse = dsd_fx.transform(TinyMLP())
    snap = snapshot(sparse)
    with pytest.raises(ValueError, match="already a sparse-phase graph.*re-dense it first"):
        dsd_fx.transform(sparse, sparsity=0.7)
    assert_unchanged(sparse, snap)


@pytest.mark.parametrize("options, words", [({"sparsity": 0.5}, r"\(it has 2 sparse weights, 0 of them packed\)"),
                                            ({"pattern": "2:4", "pack": True}, r"\(it has 2 sparse weights, 2 of them packed\)")])
def test_a_second_sparse_transform_counts_the_sparse_weights_packed_ones_too(options, words):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    sparse = dsd_fx.transform(model, **options)
    with pytest.raises(ValueError, match=words):
        dsd_fx.transform(sparse, pattern="2:4", pack=True)


def test_dense_takes_no_sparsity_options():
    sparse = dsd_fx.transform(TinyMLP())
    snap = snapshot(sparse)
    with pytest.raises(TypeError, match="no sparsity options"):
        dsd_fx.transform(sparse, phase="dense", sparsity=0.3)
    assert_unchanged(sparse, snap)


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        dsd_fx.transform(lambda x: x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(bad):
    model = TinyMLP()
    with torch.no_grad():
        model.fc2.weight[0, 0] = bad
    assert_rejected({}, ValueError, ["'fc2.weight' holds NaN or Inf"], model)


def test_weight_read_inside_a_module_we_cannot_mask():
    class Tied(nn.Module):  # a LayerNorm over a 4x4 shape holds a 2-D weight that dsd_fx cannot mask
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm((4, 4))
            self.out = nn.Linear(4, 4, bias=False)
            self.out.weight = self.norm.weight

        def forward(self, x):
            return self.out(self.norm(x))

    assert_rejected({}, ValueError, ["read inside module 'norm'", "LayerNorm", "exclude=['norm.weight']"], Tied())


def test_untraceable_model_names_the_line():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return x

    assert_rejected({}, TypeError, ["Branchy", "if x.sum() > 0", "concrete_args", "leaf"], Branchy())


def test_bare_passes_import_is_refused(tmp_path):
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", "import passes"], cwd=root, capture_output=True, text=True)
    assert out.returncode != 0 and "dsd_fx.passes" in out.stderr


def test_untraceable_submodule_is_named_with_its_line():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            for row in x:  # iterating a Proxy
                x = x + row
            return self.fc(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(4, 4), Gate())

        def forward(self, x):
            return self.encoder(x)

    words = ["submodule 'encoder.1' (Gate) of Net", "for row in x", "make the failing submodule 'encoder.1' a leaf", "concrete_args"]
    assert_rejected({}, TypeError, words, Net())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_work(dtype):
    from conftest import TinyMLP

    model = TinyMLP().to(dtype)
    sparse = dsd_fx.transform(model, sparsity=0.5)
    assert all(b.dtype == dtype for n, b in sparse.named_buffers() if n.endswith("_mask"))
    assert float((model.fc1.weight == 0).float().mean()) == 0.5
    sparse(torch.randn(2, 8, dtype=dtype)).float().sum().backward()
    nm = dsd_fx.transform(TinyMLP().to(dtype), pattern="2:4", method="sr-ste")
    nm(torch.randn(2, 8, dtype=dtype)).float().sum().backward()
    dense = dsd_fx.transform(sparse, phase="dense")
    assert all(p.dtype == dtype for p in dense.parameters())


def test_quantized_weights_are_refused():
    class Q(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.quantize_per_tensor(torch.randn(4, 4), 0.1, 0, torch.qint8), requires_grad=False)

        def forward(self, x):
            return x @ self.w.dequantize()

    # the parameter is read through dequantize(): not a matmul operand of its own, so nothing to prune
    assert_rejected({}, ValueError, ["no prunable weight"], Q())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_weights_work():
    from conftest import TinyMLP

    model = TinyMLP().cuda()
    sparse = dsd_fx.transform(model, sparsity=0.5)
    sparse(torch.randn(2, 8, device="cuda")).sum().backward()
    assert all(b.is_cuda for b in sparse.buffers())
    dense = dsd_fx.transform(sparse, phase="dense")
    assert all(p.is_cuda for p in dense.parameters())
