import copy
import importlib
import importlib.util
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

import dsd_fx
from conftest import Functional, TinyCNN, TinyMLP, mlp_args

SPARSE_DIFF = """--- before
+++ after
@@ -1,5 +1,13 @@
 def forward(self, x):
-    fc1 = self.fc1(x);  x = None
-    relu = torch.relu(fc1);  fc1 = None
-    fc2 = self.fc2(relu);  relu = None
-    return fc2
+    fc1_weight = self.fc1.weight
+    fc1_weight_mask = self.fc1.weight_mask
+    mask_mul = dsd_fx_ops_mask_mul(fc1_weight, fc1_weight_mask, grad_inplace = True);  fc1_weight = fc1_weight_mask = None
+    fc1_bias = self.fc1.bias
+    linear = torch._C._nn.linear(x, mask_mul, fc1_bias);  x = mask_mul = fc1_bias = None
+    relu = torch.relu(linear);  linear = None
+    fc2_weight = self.fc2.weight
+    fc2_weight_mask = self.fc2.weight_mask
+    mask_mul_1 = dsd_fx_ops_mask_mul(fc2_weight, fc2_weight_mask, grad_inplace = True);  fc2_weight = fc2_weight_mask = None
+    fc2_bias = self.fc2.bias
+    linear_1 = torch._C._nn.linear(relu, mask_mul_1, fc2_bias);  relu = mask_mul_1 = fc2_bias = None
+    return linear_1"""


def test_golden_sparse_and_dense_diff():
    model = TinyMLP()
    sparse = dsd_fx.transform(copy.deepcopy(model))
    d = dsd_fx.diff(model, sparse)
    assert d.code == SPARSE_DIFF
    assert d.render(color=False).endswith("# nodes: +6 get_attr, +2 mask_mul, 2 call_module -> call_function")
    back = dsd_fx.diff(sparse, dsd_fx.transform(sparse, phase="dense"))
    assert back.summary == "-6 get_attr, -2 mask_mul, 2 call_function -> call_module"
    flipped = [("+" if ln[0] == "-" else "-" if ln[0] == "+" else ln[0]) + ln[1:] for ln in SPARSE_DIFF.splitlines()[3:]]
    assert sorted(back.code.splitlines()[3:]) == sorted(flipped)  # the re-dense diff is the exact inverse


def test_node_counts_are_structural_not_by_name():
    model = TinyCNN()
    sparse = dsd_fx.transform(copy.deepcopy(model))
    d = dsd_fx.diff(model, sparse)
    layers = 8  # every weight-bearing module of TinyCNN
    assert d.counts["+get_attr"] == 2 * layers + sum(m.bias is not None for m in model.modules() if hasattr(m, "bias") and isinstance(m.bias, torch.Tensor))
    assert d.counts["+mask_mul"] == layers
    assert d.counts["call_module -> call_function"] == layers
    assert d.counts["+pad"] == 1  # conv2 has padding_mode='reflect'
    assert not d.removed
    # weights read by get_attr keep their node: the mask_mul is added after it, nothing is "changed"
    f = Functional()
    d = dsd_fx.diff(f, dsd_fx.transform(copy.deepcopy(f)))
    assert d.counts["+mask_mul"] == 6 and d.counts["+get_attr"] == 6 and not d.changed and not d.removed


def test_color_only_when_asked():
    d = dsd_fx.diff(TinyMLP(), dsd_fx.transform(TinyMLP()))
    assert "\033[" not in d.render(color=False)
    assert "\033[32m+" in d.render(color=True)


def test_print_changed_modes(capsys, tmp_path, monkeypatch):
    model = TinyMLP()
    sparse = dsd_fx.transform(model, print_changed="diff")
    err = capsys.readouterr().err
    assert "*** insert_masks (sparse phase) ***" in err and "+    fc1_weight_mask = self.fc1.weight_mask" in err
    dsd_fx.transform(sparse, phase="dense", print_changed="quiet")
    err = capsys.readouterr().err
    assert "*** code after strip_masks (dense phase) ***" in err and "unpack_nm" not in err  # unchanged passes print nothing
    dsd_fx.transform(TinyMLP(), print_changed="diff", print_changed_passes=["pack_nm"])
    assert capsys.readouterr().err == ""  # filtered out
    monkeypatch.setenv("DSD_FX_PRINT_CHANGED", "diff")
    monkeypatch.setenv("DSD_FX_PRINT_CHANGED_DIR", str(tmp_path / "tree"))
    sparse = dsd_fx.transform(TinyMLP(), pattern="2:4", pack=True)
    dsd_fx.transform(sparse, phase="dense")
    assert "*** pack_nm (sparse phase) ***" in capsys.readouterr().err
    folders = sorted(p.name for p in (tmp_path / "tree").iterdir())
    assert folders == ["00_sparse_pack_nm", "01_dense_unpack_nm", "02_dense_strip_masks"]
    assert (tmp_path / "tree" / "00_sparse_pack_nm" / "after.py").read_text().count("nm_linear") >= 2
    records = dsd_fx.changes(sparse)
    assert [r.name for r in records] == ["pack_nm"] and records[0].diff is not None


def test_no_recording_by_default():
    sparse = dsd_fx.transform(TinyMLP())
    (record,) = dsd_fx.changes(sparse)
    assert record.name == "insert_masks" and record.modified and record.diff is None


def test_bad_print_changed_mode():
    with pytest.raises(ValueError, match="print_changed"):
        dsd_fx.transform(TinyMLP(), print_changed="loud")


def test_dot_parses_and_colours(tmp_path):
    model = TinyMLP()
    sparse = dsd_fx.transform(copy.deepcopy(model))
    d = dsd_fx.diff(model, sparse)
    pydot = pytest.importorskip("pydot")  # in the test extra: an independent DOT parser
    files = d.write_pictures(str(tmp_path / "diff"))
    (graph,) = pydot.graph_from_dot_file(files[0])
    nodes = [n for n in graph.get_nodes() if n.get_name() not in ("node", "graph", "edge")]
    # expected from the model's layers and the sparse graph itself, not from the diff object
    layers = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(nodes) == len(sparse.graph.nodes)  # nothing is removed: the union is the sparse graph
    colours = [n.get("fillcolor") for n in nodes]
    assert colours.count("palegreen") == 4 * layers  # per layer: weight, mask and bias reads, the mask_mul
    assert colours.count("khaki") == layers  # per layer: the module call became F.linear
    assert colours.count("white") == len(sparse.graph.nodes) - 5 * layers  # x, relu, output
    assert len(graph.get_edges()) == sum(len(n.all_input_nodes) for n in sparse.graph.nodes)


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_svg_has_one_element_per_node(tmp_path):
    model = TinyMLP()
    d = dsd_fx.diff(model, dsd_fx.transform(copy.deepcopy(model)))
    files = d.write_pictures(str(tmp_path / "diff"))
    svg = ET.parse(files[1]).getroot()
    groups = [g for g in svg.iter("{http://www.w3.org/2000/svg}g") if g.get("class") == "node"]
    assert len(groups) == len(d.after.nodes) + len(d.removed)
    assert (tmp_path / "diff.png").stat().st_size > 0


def test_without_graphviz_matplotlib_draws_the_png(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    d = dsd_fx.diff(TinyMLP(), dsd_fx.transform(TinyMLP()))
    files = d.write_pictures(str(tmp_path / "d"))
    assert files == [str(tmp_path / "d") + ".dot", str(tmp_path / "d") + ".png"]
    png = (tmp_path / "d.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_without_graphviz_or_matplotlib_the_dot_file_is_still_written(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(importlib.import_module("dsd_fx.diagnostics.draw"), "_has_matplotlib", lambda: False)
    d = dsd_fx.diff(TinyMLP(), dsd_fx.transform(TinyMLP()))
    assert d.write_pictures(str(tmp_path / "d")) == [str(tmp_path / "d") + ".dot"]
    assert "dot -Tsvg" in caplog.text


def test_onnx_diff_names_the_extra_nodes(tmp_path):
    model = TinyMLP()
    ref = dsd_fx.export_onnx(model, mlp_args())
    sparse = dsd_fx.transform(copy.deepcopy(model))
    raw = dsd_fx.export_onnx(sparse, mlp_args(), fold=False, optimize=False)
    d = dsd_fx.diff_onnx(ref, raw)
    assert d.counts["+Mul"] == 2 and d.counts["+initializer"] == 2
    assert "initializer fc1.weight_mask: FLOAT[16, 8]" in d.code
    folded = dsd_fx.export_onnx(sparse, mlp_args())
    assert dsd_fx.diff_onnx(ref, folded).summary == "no change"
    files = d.write_pictures(str(tmp_path / "onnx"))
    pydot = pytest.importorskip("pydot")
    assert pydot.graph_from_dot_file(files[0])


def _fake_dot(tmp_path, monkeypatch) -> None:
    """A Graphviz `dot` first on PATH that fails as a broken install does: a message and status 1."""
    folder = tmp_path / "bin"
    folder.mkdir()
    exe = folder / "dot"
    exe.write_text("#!/bin/sh\necho 'dot: cannot load plugin' >&2\nexit 1\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")
    assert shutil.which("dot") == str(exe)


def test_a_failing_dot_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    _fake_dot(tmp_path, monkeypatch)
    d = dsd_fx.diff(TinyMLP(), dsd_fx.transform(TinyMLP()))
    with caplog.at_level(logging.WARNING, logger="dsd_fx.diagnostics.draw"):
        files = d.write_pictures(str(tmp_path / "d"))
    assert files[0] == str(tmp_path / "d.dot") and (tmp_path / "d.dot").stat().st_size > 0
    assert not (tmp_path / "d.svg").exists()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(tmp_path / "d.svg") in w and "status 1" in w and "cannot load plugin" in w for w in warned), warned
    if importlib.util.find_spec("matplotlib") is not None:  # the PNG comes from matplotlib instead
        assert files == [str(tmp_path / "d.dot"), str(tmp_path / "d.png")]
        assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_transform_with_a_failing_dot_keeps_its_result(tmp_path, monkeypatch, caplog):
    _fake_dot(tmp_path, monkeypatch)
    sparse = dsd_fx.transform(TinyMLP(), pattern="2:4", pack=True, print_changed_dir=str(tmp_path / "tree"))
    assert (tmp_path / "tree" / "00_sparse_pack_nm" / "diff.dot").exists()
    assert "cannot load plugin" in caplog.text
    sparse(*mlp_args())  # the packed graph is whole


def test_a_picture_that_cannot_be_written_is_logged(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a plain file, not a folder")
    d = dsd_fx.diff(TinyMLP(), dsd_fx.transform(TinyMLP()))
    assert d.write_pictures(str(blocker / "d")) == []
    assert str(blocker / "d.dot") in caplog.text


def test_drawing_leaves_matplotlib_global_state_alone(tmp_path):
    pytest.importorskip("matplotlib")
    code = (
        # get_backend() would itself resolve (and set) the backend: read the setting as it is
        "import sys, matplotlib, dsd_fx; from conftest import TinyMLP; "
        "before = matplotlib.rcParams._get_backend_or_none(); "
        f"dsd_fx.diff(TinyMLP(), dsd_fx.transform(TinyMLP())).to_png({str(tmp_path / 'd.png')!r}); "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'; "
        "after = matplotlib.rcParams._get_backend_or_none(); assert after == before, (before, after)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(__file__).parent, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_print_changed_check_creates_the_folder(tmp_path):
    from dsd_fx.diagnostics.print_changed import PrintChanged

    folder = tmp_path / "a" / "b"
    PrintChanged(directory=str(folder)).check()
    assert folder.is_dir() and list(folder.iterdir()) == []  # the probe file is gone
    PrintChanged(mode="diff").check()  # no folder: nothing to check


def test_print_changed_check_names_a_folder_that_cannot_be_written(tmp_path):
    from dsd_fx.diagnostics.print_changed import PrintChanged

    blocker = tmp_path / "file"
    blocker.write_text("a plain file, not a folder")
    with pytest.raises(ValueError, match=r"print_changed_dir '.*/file/tree' cannot be written \(.*\); pass a folder"):
        PrintChanged(directory=str(blocker / "tree")).check()
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="locked"):
            PrintChanged(directory=str(locked)).check()
