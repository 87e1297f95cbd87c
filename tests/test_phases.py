"""transform's phases: options declared once, diagnostics before the commit, failures that change nothing."""
import copy
import logging

import pytest
import torch

import dsd_fx
from conftest import TinyMLP, assert_unchanged, snapshot
from dsd_fx.sparse.config import SparseConfig

MODES = {
    "magnitude": {"sparsity": 0.5},
    "fixed 2:4": {"pattern": "2:4"},
    "sr-ste": {"pattern": "2:4", "method": "sr-ste"},
    "packed": {"pattern": "2:4", "pack": True},
}


@pytest.mark.parametrize("mode", MODES)
def test_unwritable_diff_folder_changes_nothing(mode, tmp_path):
    """Writing the per-pass diffs fails (a folder under a plain file): the model keeps every weight."""
    plain = tmp_path / "file"
    plain.write_text("not a folder")
    model = TinyMLP()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="file/diffs"):
        dsd_fx.transform(model, print_changed_dir=str(plain / "diffs"), **MODES[mode])
    assert_unchanged(model, snap)
    assert all(p.numel() > 0 for p in model.parameters())


@pytest.mark.parametrize("mode", MODES)
def test_unwritable_diff_folder_on_redense_changes_nothing(mode, tmp_path):
    plain = tmp_path / "file"
    plain.write_text("not a folder")
    sparse = dsd_fx.transform(TinyMLP(), **MODES[mode])
    snap = snapshot(sparse)
    with pytest.raises(ValueError, match="file/diffs"):
        dsd_fx.transform(sparse, phase="dense", print_changed_dir=str(plain / "diffs"))
    assert_unchanged(sparse, snap)


@pytest.mark.parametrize("option", SparseConfig.option_names())
def test_dense_phase_refuses_every_sparse_option(option):
    sparse = dsd_fx.transform(TinyMLP())
    value = SparseConfig.__dataclass_fields__[option].default
    snap = snapshot(sparse)
    with pytest.raises(TypeError, match=f"no sparsity options.*{option}"):
        dsd_fx.transform(sparse, phase="dense", **{option: value})
    assert_unchanged(sparse, snap)


def test_dense_phase_refuses_a_config():
    sparse = dsd_fx.transform(TinyMLP())
    with pytest.raises(TypeError, match="config"):
        dsd_fx.transform(sparse, phase="dense", config=SparseConfig())


@pytest.mark.parametrize("option", [{"lambda_w": 1e-3}, {"sparsity": 0.3}, {"kernel": "dense"}])
def test_config_together_with_an_option_is_refused(option):
    model = TinyMLP()
    snap = snapshot(model)
    with pytest.raises(TypeError, match=f"either config= or the sparse options.*{next(iter(option))}"):
        dsd_fx.transform(model, config=SparseConfig(pattern="2:4", method="sr-ste"), **option)
    assert_unchanged(model, snap)


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(TypeError, match="sparsty.*sparsity"):
        dsd_fx.transform(TinyMLP(), sparsty=0.5)


def test_config_is_the_same_as_its_options():
    a, b = TinyMLP(), TinyMLP()
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 8)
    by_config = dsd_fx.transform(a, config=SparseConfig(sparsity=0.7, scope="global"))
    by_options = dsd_fx.transform(b, sparsity=0.7, scope="global")
    assert by_config.code == by_options.code
    torch.testing.assert_close(by_config(x), by_options(x), rtol=0, atol=0)


def test_dsd_checks_its_sparse_options_before_the_dense_phase():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dsd_fx.DSD(TinyMLP(), torch.optim.SGD, lr=0.1, sparsity=1.5)
    with pytest.raises(ValueError, match="needs a pattern"):
        dsd_fx.DSD(TinyMLP(), torch.optim.SGD, lr=0.1, method="sr-ste")


def test_a_compiled_model_is_transformed_through_its_original_module(caplog):
    model = TinyMLP()
    compiled = torch.compile(model)
    with caplog.at_level(logging.WARNING, logger="dsd_fx.infra.graph_capture"):
        sparse = dsd_fx.transform(compiled)
    assert "torch.compile wrapper" in caplog.text and "TinyMLP" in caplog.text
    assert sparse.get_parameter("fc1.weight") is model.fc1.weight
    x = torch.randn(2, 8)
    torch.testing.assert_close(sparse(x), model.fc2(torch.relu(model.fc1(x))))


def test_push_phase_taps_and_redense_removes_taps_and_masks():
    model = TinyMLP()
    reference = torch.fx.symbolic_trace(TinyMLP())
    pushed = dsd_fx.transform(dsd_fx.transform(model, sparsity=0.5), phase="push")
    x = torch.randn(4, 8)
    out = pushed(x)
    assert "tap" in pushed.code
    (recorded,) = pushed._dsd_fx_taps.activations.values()  # the classifier's input: relu(fc1(x)), masked
    torch.testing.assert_close(recorded, torch.relu(model.fc1(x)), rtol=0, atol=0)
    dense = dsd_fx.transform(pushed, phase="dense")
    assert dense.code == reference.code
    assert list(dense.state_dict()) == list(reference.state_dict())
    torch.testing.assert_close(dense(x), out)


def test_push_phase_refuses_sparse_options():
    with pytest.raises(TypeError, match="phase='push' does not take sparsity"):
        dsd_fx.transform(TinyMLP(), phase="push", sparsity=0.5)
    with pytest.raises(TypeError, match="taps"):
        dsd_fx.transform(TinyMLP(), phase="sparse", taps=["fc2"])


class Reused(torch.nn.Module):
    """a(b(a(x))): a's second call reads b's call, which the rewrite reaches after a's."""

    def __init__(self, conv: bool = False):
        super().__init__()
        make = (lambda **kw: torch.nn.Conv2d(4, 4, 3, padding=1, **kw)) if conv else (lambda **kw: torch.nn.Linear(8, 8))
        self.a, self.b = make(), make(padding_mode="reflect") if conv else make()

    def forward(self, x):
        return self.a(self.b(self.a(x)))


class ReadFirst(torch.nn.Module):
    """fc2's weight read through F.linear before fc2 is called on fc1's output."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.fc2(self.fc1(torch.nn.functional.linear(x, self.fc2.weight)))


CASES = {"linear": (Reused, (2, 8)), "conv, padded": (lambda: Reused(conv=True), (1, 4, 6, 6)), "read first": (ReadFirst, (2, 8))}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", MODES)
def test_reused_layers_round_trip(case, mode):
    make, shape = CASES[case]
    torch.manual_seed(0)
    model, reference = make(), torch.fx.symbolic_trace(make())
    x = torch.randn(*shape)
    sparse = dsd_fx.transform(model, **MODES[mode])
    out = sparse(x)
    dense = dsd_fx.transform(sparse, phase="dense")
    assert dense.code == reference.code
    torch.testing.assert_close(dense(x), out)


@pytest.mark.parametrize("options, exc, words", [
    ({"pack": "false", "pattern": "2:4"}, TypeError, "pack must be True or False"),
    ({"lambda_w": -1.0}, ValueError, "lambda_w must be a float >= 0"),
    ({"lambda_w": 1e-3}, ValueError, "needs method='sr-ste'"),
    ({"strict": True}, ValueError, "strict=True"),
    ({"kernel": "sparse"}, ValueError, "needs pack=True"),
])
def test_every_option_is_checked_not_ignored(options, exc, words):
    model = TinyMLP()
    snap = snapshot(model)
    with pytest.raises(exc, match=words):
        dsd_fx.transform(model, **options)
    assert_unchanged(model, snap)


def test_a_sparse_graph_that_lost_its_record_is_not_sparsified_twice():
    sparse = dsd_fx.transform(TinyMLP(), sparsity=0.5, exclude=["fc2"])
    lost = torch.fx.GraphModule(sparse, sparse.graph)  # the graph's nodes, without the record module
    with pytest.raises(ValueError, match="already a sparse-phase graph"):
        dsd_fx.transform(lost, sparsity=0.5)


@pytest.mark.parametrize("kernel", ["auto", "sparse", "dense"])
def test_packed_graph_runs_with_every_kernel_choice(kernel):
    model = TinyMLP()
    ref = copy.deepcopy(model)
    x = torch.randn(3, 8)
    packed = dsd_fx.transform(model, pattern="2:4", pack=True, kernel=kernel)
    keep = dsd_fx.current_masks(packed)
    expected = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, ref.fc1.weight * keep["fc1.weight"], ref.fc1.bias)),
                                          ref.fc2.weight * keep["fc2.weight"], ref.fc2.bias)
    torch.testing.assert_close(packed(x), expected)


def test_an_attribute_named_like_dsd_fx_storage_is_refused():
    model = TinyMLP()
    model.fc1.register_buffer("weight_meta", torch.ones(3))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="'fc1' already has an attribute 'weight_meta'"):
        dsd_fx.transform(model, pattern="2:4", pack=True)
    assert_unchanged(model, snap)
    dsd_fx.transform(model, sparsity=0.5)  # unstructured masks make no weight_meta: fine


def test_the_masked_use_invariant_sees_module_calls(monkeypatch):
    """A rewrite that left a module call reading its sparse weight unmasked is caught before the commit."""
    import dsd_fx.infra.rewrite

    monkeypatch.setattr(dsd_fx.infra.rewrite, "functionalize", lambda *a, **k: None)
    model = TinyMLP()
    snap = snapshot(model)
    with pytest.raises(dsd_fx.infra.pipeline.PassError, match="module call fc1 reads sparse weight"):
        dsd_fx.transform(model, pattern="2:4", pack=False)
    assert_unchanged(model, snap)


def test_a_dynamic_weight_left_without_its_op_is_caught(monkeypatch):
    import dsd_fx.passes.insert_nm as insert_nm

    real = insert_nm.wrap_weight_uses
    monkeypatch.setattr(insert_nm, "wrap_weight_uses", lambda gm, items, name: real(gm, items[:1], name))
    model = TinyMLP()
    snap = snapshot(model)
    with pytest.raises(dsd_fx.infra.pipeline.PassError, match="fc2.weight"):
        dsd_fx.transform(model, pattern="2:4", method="sr-ste")
    assert_unchanged(model, snap)


def test_dsd_refuses_a_config_that_is_not_a_sparse_config():
    with pytest.raises(TypeError, match="SparseConfig"):
        dsd_fx.DSD(TinyMLP(), torch.optim.SGD, lr=0.1, config={"sparsity": 0.5})
