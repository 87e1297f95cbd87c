import argparse
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "dsd_fx", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("cmd", ["demo", "diff", "export", "check"])
def test_help(cmd):
    out = run(cmd, "--help")
    assert out.returncode == 0 and "usage: dsd-fx " + cmd in out.stdout


def test_diff_prints_each_pass_and_writes_pictures(tmp_path):
    out = run("diff", "examples.models:cnn", "--input-shape", "1,3,8,8", "--out", str(tmp_path / "d"))
    assert out.returncode == 0, out.stderr
    assert "*** insert_masks (sparse phase) ***" in out.stderr and "*** strip_masks (dense phase) ***" in out.stderr
    assert "# nodes: +" in out.stderr
    folders = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert folders == ["00_sparse_insert_masks", "01_dense_strip_masks"]
    assert (tmp_path / "d" / "00_sparse_insert_masks" / "diff.dot").exists()


def test_diff_with_pattern_and_pack():
    out = run("diff", "examples.models:mlp", "--input-shape", "1,8", "--pattern", "2:4", "--pack")
    assert out.returncode == 0, out.stderr
    assert "*** pack_nm (sparse phase) ***" in out.stderr and "*** unpack_nm (dense phase) ***" in out.stderr


def test_export_then_check(tmp_path):
    ref, fin = tmp_path / "ref.onnx", tmp_path / "fin.onnx"
    assert run("export", "examples.models:cnn", "--input-shape", "1,3,8,8", "-o", str(ref)).returncode == 0
    assert run("export", "examples.models:cnn", "--input-shape", "1,3,8,8", "--sparse", "-o", str(fin)).returncode == 0
    out = run("check", str(ref), str(fin))
    assert out.returncode == 0 and "zero overhead: PROVEN" in out.stdout


def test_capture_flag_takes_a_model_fx_cannot_trace(tmp_path):
    shape = ("--input-shape", "2,5,8")
    out = run("diff", "examples.models:causal", *shape, "--capture", "fx")
    assert out.returncode == 2 and "torch.fx could not trace" in out.stderr and 'capture="export"' in out.stderr
    for capture in ("auto", "export"):
        out = run("diff", "examples.models:causal", *shape, "--capture", capture)
        assert out.returncode == 0, out.stderr
        assert "*** insert_masks (sparse phase) ***" in out.stderr and "aten.linear.default" in out.stderr
    ref, fin = tmp_path / "ref.onnx", tmp_path / "fin.onnx"
    assert run("export", "examples.models:causal", *shape, "-o", str(ref)).returncode == 0
    assert run("export", "examples.models:causal", *shape, "--sparse", "--capture", "export", "-o", str(fin)).returncode == 0
    out = run("check", str(ref), str(fin))
    assert out.returncode == 0 and "zero overhead: PROVEN" in out.stdout


def test_check_fails_naming_the_difference(tmp_path):
    import copy

    import dsd_fx
    from conftest import TinyMLP, mlp_args

    model = TinyMLP()
    dsd_fx.export_onnx(model, mlp_args(), tmp_path / "ref.onnx")
    dsd_fx.export_onnx(dsd_fx.transform(copy.deepcopy(model)), mlp_args(), tmp_path / "bad.onnx", fold=False, optimize=False)
    out = run("check", str(tmp_path / "ref.onnx"), str(tmp_path / "bad.onnx"))
    assert out.returncode == 1 and "NOT PROVEN" in out.stdout
    assert "(Mul) reading fc1.weight, fc1.weight_mask" in out.stdout and "extra initializer 'fc2.weight_mask'" in out.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["diff", "nosuch.module:make", "--input-shape", "1,8"], "cannot import module 'nosuch.module'"),
        (["diff", "examples.models", "--input-shape", "1,8"], "is not MODULE:FACTORY"),
        (["diff", "examples.models:nothing", "--input-shape", "1,8"], "has no callable 'nothing'"),
        (["diff", "examples.models:mlp", "--input-shape", "1,x"], "is not comma-separated integers"),
        (["diff", "examples.models:mlp", "--input-shape", "1,5"], "does not run on --input-shape 1,5"),
        (["diff", "examples.models:mlp", "--input-shape", "1,8", "--sparsity", "2"], "[0, 1)"),
        (["diff", "examples.models:mlp", "--input-shape", "1,8", "--pack"], "--pack stores N:M-packed weights and needs a pattern such as --pattern 2:4"),
        (["diff", "examples.models:mlp", "--input-shape", "1,8", "--pattern", "5:4"], "--pattern '5:4' needs 1 <= N < M"),
        (["diff", "examples.models:mlp", "--input-shape", "1,8", "--pattern", "2:4", "--sparsity", "0.3"], "drop --sparsity 0.3"),
        (["diff", "examples.models:mlp", "--input-shape", "1,8", "--method", "sr-ste"], "--method sr-ste recomputes an N:M mask"),
        (["diff", "examples.models:mlp", "--input-shape", "1,8", "--method", "bogus"], "invalid choice: 'bogus'"),
        (["diff", "examples.models:mlp", "--input-shape", "1,8", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["export", "examples.models:mlp", "--input-shape", "1,8", "--sparsity", "0.2", "-o", "m.onnx"], "add --sparse or --pattern"),
        (["export", "examples.models:mlp", "--input-shape", "1,8", "-o", "/nonexistent/dir/m.onnx"], "not writable"),
        (["check", "missing_a.onnx", "missing_b.onnx"], "no such file: missing_a.onnx"),
    ],
)
def test_errors_are_one_line_and_exit_2(args, words):
    out = run(*args)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in out.stderr


@pytest.mark.parametrize("content, words", [("not a model", "is not an ONNX model"),
                                            ("", "is not an ONNX model: it is empty (0 bytes)")], ids=["garbage", "empty"])
def test_check_rejects_a_non_onnx_file(tmp_path, content, words):
    bad = tmp_path / "x.onnx"
    bad.write_text(content)
    out = run("check", str(bad), str(bad))
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and words in lines[0], out.stderr


def test_installed_console_script():
    exe = shutil.which("dsd-fx")
    if exe is None:
        pytest.skip("dsd-fx is not on PATH (package not installed)")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "check" in out.stdout


def _args(*flags: str):
    from dsd_fx.cli import build_parser

    return build_parser().parse_args(["diff", "examples.models:mlp", "--input-shape", "1,8", *flags])


def test_flags_build_one_sparse_config():
    from dsd_fx.cli import _sparse_options
    from dsd_fx.sparse.config import SparseConfig

    assert _sparse_options(_args()) == SparseConfig()
    assert _sparse_options(_args("--sparsity", "0.25")) == SparseConfig(sparsity=0.25)
    assert _sparse_options(_args("--pattern", "2:4", "--method", "sr-ste")) == SparseConfig(pattern="2:4", method="sr-ste")
    assert _sparse_options(_args("--pattern", "4:8", "--pack")) == SparseConfig(pattern="4:8", pack=True)
    demo_like = argparse.Namespace(sparsity=None, pattern="2:4", method="sr-ste")  # no --pack, no --kernel
    assert _sparse_options(demo_like) == SparseConfig(pattern="2:4", method="sr-ste")


def test_config_errors_in_flag_words():
    from dsd_fx.cli import in_flag_words

    assert in_flag_words("pack=True keeps only the kept values; method='sr-ste' recomputes it. Use method='fixed' "
                         "with pack=True, or pack=False") == (
        "--pack keeps only the kept values; --method sr-ste recomputes it. Use --method fixed with --pack, or no --pack")
    assert in_flag_words("sparsity must be in [0, 1)") == "--sparsity must be in [0, 1)"
    assert in_flag_words("drop sparsity=0.3 (use sparsity without a pattern)") == "drop --sparsity 0.3 (use sparsity without a pattern)"


def test_kernel_flag_and_its_environment_default(monkeypatch):
    from dsd_fx.cli import CliError, _sparse_options
    from dsd_fx.sparse.config import SparseConfig

    monkeypatch.setenv("DSD_FX_NM_KERNEL", "dense")
    assert _sparse_options(_args("--pattern", "2:4", "--pack")) == SparseConfig(pattern="2:4", pack=True, kernel="dense")
    assert _sparse_options(_args("--pattern", "2:4", "--pack", "--kernel", "auto")).kernel == "auto"  # the flag wins
    assert _sparse_options(_args("--pattern", "2:4")) == SparseConfig(pattern="2:4")  # no packed kernel to choose
    with pytest.raises(CliError, match=r"^--kernel dense chooses the packed N:M op's kernel and needs --pack$"):
        _sparse_options(_args("--pattern", "2:4", "--kernel", "dense"))
    monkeypatch.setenv("DSD_FX_NM_KERNEL", "fast")
    with pytest.raises(CliError, match=r"^DSD_FX_NM_KERNEL=fast \(the default of --kernel\): --kernel must be one of"):
        _sparse_options(_args("--pattern", "2:4", "--pack"))


TWO_INPUTS = '''
import torch.nn as nn


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(4, 4)

    def forward(self, x, y):
        return {"out": self.a(x) + self.b(y)}


def two():
    return Two()
'''


@pytest.mark.parametrize("factory, shape", [("examples.models:mlp", "1,5"), ("examples.models:cnn", "1,3"),
                                            ("twoin:two", "1,8"), ("twoin:two", "1,8;1,5")],
                         ids=["mlp_wrong_features", "cnn_wrong_rank", "two_inputs_given_one", "two_inputs_wrong_second"])
def test_export_with_an_input_shape_that_does_not_fit_is_one_line_and_exit_2(tmp_path, factory, shape):
    (tmp_path / "twoin.py").write_text(TWO_INPUTS)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    out = run("export", factory, "--input-shape", shape, "-o", str(tmp_path / "m.onnx"), cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"does not run on --input-shape {shape}" in lines[0], out.stderr[-2000:]
    assert not (tmp_path / "m.onnx").exists()


def test_export_of_a_two_input_factory_given_both_shapes(tmp_path):
    (tmp_path / "twoin.py").write_text(TWO_INPUTS)
    out = run("export", "twoin:two", "--input-shape", "1,8;1,4", "-o", str(tmp_path / "m.onnx"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "m.onnx").stat().st_size > 0


@pytest.mark.parametrize("where, words", [
    ("folder", "is a folder or no file name"),
    ("folder/", "is a folder or no file name"),
    ("", "is a folder or no file name"),
    ("missing/m.onnx", "does not exist or is not writable"),
    ("/proc/dsd_fx_m.onnx", "is not writable"),  # root may write anywhere os.access looks; not to /proc
], ids=["existing_folder", "trailing_separator", "empty", "missing_folder", "unwritable"])
def test_export_output_that_cannot_be_written_is_one_line_and_exit_2_before_the_work(tmp_path, where, words):
    if where.startswith("/proc") and not pathlib.Path("/proc/self").exists():
        pytest.skip("no /proc on this system")
    (tmp_path / "folder").mkdir()
    # a factory that would leave a mark if it ran: the output is checked before the work
    (tmp_path / "marks.py").write_text("import pathlib, torch\n\ndef make():\n    pathlib.Path('ran').touch()\n"
                                       "    return torch.nn.Linear(8, 2)\n")
    out = run("export", "marks:make", "--input-shape", "1,8", "-o", where, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], out.stderr[-2000:]
    assert not (tmp_path / "ran").exists() and list((tmp_path / "folder").iterdir()) == []
