"""The pass runner: invariants after every pass, user errors unwrapped, observers see changed passes only."""
import pytest
import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from conftest import TinyMLP
from dsd_fx.infra.pipeline import Invariant, PassError, run_passes


def _gm():
    return fx.symbolic_trace(TinyMLP())


def _relu_to_sigmoid(gm):
    for n in gm.graph.nodes:
        if n.target is torch.relu:
            n.target = torch.sigmoid
    return PassResult(gm, True)


def _nothing(gm):
    return PassResult(gm, False)


def _no_relu(gm):
    if any(n.target is torch.relu for n in gm.graph.nodes):
        raise AssertionError("a relu is left")


def test_an_invariant_is_checked_after_every_pass():
    with pytest.raises(PassError, match="invariant 'no relu' does not hold after pass 'first'.*a relu is left"):
        run_passes(_gm(), [("first", _nothing), ("second", _relu_to_sigmoid)], [Invariant("no relu", _no_relu)])
    gm = _gm()
    run_passes(gm, [("first", _relu_to_sigmoid), ("second", _nothing)], [Invariant("no relu", _no_relu)])
    assert "sigmoid" in gm.code


def test_final_invariants_run_once_at_the_end():
    gm = _gm()
    run_passes(gm, [("first", _nothing), ("second", _relu_to_sigmoid)], final=[Invariant("no relu", _no_relu)])
    assert "sigmoid" in gm.code


def test_a_user_error_of_a_pass_propagates_as_it_is():
    def refuse(gm):
        raise ValueError("layer 'fc1' has 7 features; exclude it")

    with pytest.raises(ValueError, match="layer 'fc1' has 7 features") as err:
        run_passes(_gm(), [("refuse", refuse)])
    assert type(err.value) is ValueError


def test_an_internal_failure_names_the_passes_that_ran():
    def broken(gm):
        raise KeyError("oops")

    with pytest.raises(PassError, match="pass 'broken' failed \\(passes run before it: first\\): KeyError"):
        run_passes(_gm(), [("first", _nothing), ("broken", broken)])


def test_the_observer_sees_the_passes_that_changed_the_graph():
    seen = []

    class Observer:
        def before(self, gm):
            return gm.code

        def after(self, name, snapshot, gm):
            seen.append((name, "relu" in snapshot, "sigmoid" in gm.code))
            return "diff of " + name

    records = run_passes(_gm(), [("idle", _nothing), ("swap", _relu_to_sigmoid)], observer=Observer())
    assert seen == [("swap", True, True)]
    assert [(r.name, r.modified, r.diff) for r in records] == [("idle", False, None), ("swap", True, "diff of swap")]
    assert "relu" in records[1].before and "sigmoid" in records[1].after


def test_an_invariant_that_cannot_even_run_is_a_pass_error():
    def needs_a_buffer(gm):
        gm.get_buffer("fc1.weight_mask")

    with pytest.raises(PassError, match="invariant 'has masks' does not hold after pass 'idle'"):
        run_passes(_gm(), [("idle", _nothing)], [Invariant("has masks", needs_a_buffer)])


def test_each_pass_is_named_once():
    """A pass module's PASS is the one spelling of its name: no other module types it out."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    passes = {p.stem: p for p in (root / "passes").glob("*.py") if p.stem != "__init__"}
    for name, path in passes.items():
        tree = ast.parse(path.read_text())
        defined = [n.value.value for n in tree.body if isinstance(n, ast.Assign) and [getattr(t, "id", None) for t in n.targets] == ["PASS"]]
        assert defined == [name], f"passes/{name}.py defines PASS = {defined}"
    for path in [*(root / "dsd_fx").rglob("*.py"), *passes.values()]:
        spelled = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant) and n.value in passes}
        assert spelled <= {path.stem}, f"{path.relative_to(root)} types out the pass name(s) {sorted(spelled - {path.stem})}"
