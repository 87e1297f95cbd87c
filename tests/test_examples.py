import pathlib
import subprocess
import sys

import pytest

# every example that runs a flow ends with the proof; models.py only holds factories for the CLI
EXAMPLES = sorted(p for p in (pathlib.Path(__file__).resolve().parents[1] / "examples").glob("*.py") if p.name != "models.py")


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.startswith("skipped: needs"):  # hf_model.py without transformers
        pytest.skip(out.stdout.strip())
    assert "zero overhead: PROVEN" in out.stdout or "pruned: same graph, smaller shapes: PROVEN" in out.stdout


def demo(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dsd_fx", "demo", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_demo_writes_every_output(tmp_path):
    import json
    import re

    import onnx

    out = demo("--quick", "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "on MNIST-1D (4000 train / 1000 test)" in out.stderr  # the default task
    assert "zero overhead: PROVEN" in out.stdout
    for phase in ("dense", "sparse", "re-dense"):
        assert f"\n{phase} " in out.stdout  # the table
        assert f"{phase} " in out.stderr and "[###" in out.stderr  # a progress bar per phase
    d = tmp_path / "out"
    for name in ("model.onnx", "reference.onnx"):
        onnx.checker.check_model(onnx.load(d / name))
    assert (d / "zero_overhead.txt").read_text().startswith("check")
    assert "zero overhead: PROVEN" in (d / "zero_overhead.txt").read_text()
    assert (d / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((d / "metrics.json").read_text())
    assert [p["phase"] for p in metrics["phases"]] == ["dense", "sparse", "re-dense"]
    assert abs(metrics["phases"][1]["sparsity"] - 0.5) < 0.01 and metrics["zero_overhead"] is True
    passes = sorted(p.name for p in (d / "diffs").iterdir())
    assert passes == ["00_sparse_insert_masks", "01_dense_strip_masks"]
    for p in passes:  # the per-pass diff as text and as a picture
        assert "mask_mul" in (d / "diffs" / p / "diff.txt").read_text()
        assert (d / "diffs" / p / "diff.png").read_bytes()[:4] == b"\x89PNG"
    # both curves, one point per epoch; the baseline is the DSD run until the fork, then its own
    dsd, base = metrics["curves"]["dsd"], metrics["curves"]["baseline"]
    assert [e["epoch"] for e in dsd] == [e["epoch"] for e in base] == [1, 2, 3]
    assert [e["phase"] for e in dsd] == ["dense", "sparse", "redense"]
    assert dsd[0] == base[0]
    assert dsd[1]["loss"] != base[1]["loss"] and dsd[2]["loss"] != base[2]["loss"]
    # the table's baseline row: the final test accuracy of each run and their difference
    row = re.search(r"final test accuracy: D -> S -> D (\d\.\d+), dense baseline (\d\.\d+), difference ([-+]\d\.\d+)",
                    out.stdout)
    assert row, out.stdout
    acc, base_acc, diff = (float(g) for g in row.groups())
    assert acc == round(dsd[-1]["accuracy"], 3) and base_acc == round(base[-1]["accuracy"], 3)
    assert abs(diff - (dsd[-1]["accuracy"] - base[-1]["accuracy"])) < 1e-3
    final = metrics["final"]
    assert final["dsd_test_accuracy"] == dsd[-1]["accuracy"] and final["baseline_test_accuracy"] == base[-1]["accuracy"]
    assert final["difference"] == pytest.approx(dsd[-1]["accuracy"] - base[-1]["accuracy"])
    # the same seed gives the same run, both curves; another seed another dataset and run
    again = demo("--quick", "--out", str(tmp_path / "again"))
    redo = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert redo["curves"] == metrics["curves"], again.stderr[-2000:]


def test_cli_demo_on_digits_with_the_mlp(tmp_path):
    import json

    out = demo("--quick", "--data", "digits", "--model", "mlp", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MLP on scikit-learn digits (1348 train / 449 test)" in out.stderr
    assert "zero overhead: PROVEN" in out.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["args"]["data"] == "digits" and metrics["args"]["model"] == "mlp"
    assert len(metrics["curves"]["baseline"]) == 3


def test_cli_demo_sr_ste_logs_sad(tmp_path):
    import json

    out = demo("--epochs", "1", "--pattern", "2:4", "--method", "sr-ste", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["sad"] and metrics["sad"][0]["phase"] == "sparse"
    assert (tmp_path / "diffs" / "00_sparse_insert_nm" / "diff.txt").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--epochs", "0"], ["--epochs must be at least 1, got 0"]),
        (["--sparsity", "1.5"], ["--sparsity", "1.5"]),  # SparseConfig's check, in the flag's name
        (["--method", "sr-ste"], ["--method sr-ste", "--pattern"]),
        (["--pattern", "2x4"], ["--pattern", "2x4"]),
        (["--lr", "0"], ["--lr must be > 0"]),  # DSD's check, in the flag's name
        (["--seed", "-1"], ["--seed", "-1"]),  # the loader's check
        (["--pattern", "1:7"], ["1:7"]),  # no layer of the CNN takes it: found before the dense phase
    ],
)
def test_cli_demo_rejects_bad_options(args, words, tmp_path):
    out = demo(*args, "--out", str(tmp_path / "o"))
    assert out.returncode == 2, out.stderr[-2000:]
    message = out.stderr.strip()
    assert "\n" not in message and "[###" not in message  # one line, nothing trained
    for w in words:
        assert w in message
    assert not any(f"{k}=" in message for k in ("sparsity", "pattern", "method", "lr"))  # flags, not keywords
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize(
    "message, flags",
    [
        ("sparsity must be in [0, 1); got 1.5", "--sparsity must be in [0, 1); got 1.5"),
        ("method='sr-ste' needs a pattern; add pattern='2:4' (or another 'N:M')",
         "--method sr-ste needs a pattern; add --pattern 2:4 (or another 'N:M')"),
        ("pattern '2x4' is not of the form 'N:M'", "--pattern '2x4' is not of the form 'N:M'"),
        ("pattern='2:4' fixes the sparsity at 1 - N/M; drop sparsity=0.3", "--pattern 2:4 fixes the sparsity at 1 - N/M; drop --sparsity 0.3"),
        ("lr must be > 0, got 0.0", "--lr must be > 0, got 0.0"),
    ],
)
def test_demo_words_config_errors_in_flag_names(message, flags):
    from dsd_fx.demo.dsd import flag_words

    assert flag_words(message) == flags


def test_cli_demo_refuses_an_unwritable_folder_before_training(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = demo("--out", str(tmp_path / "file" / "out"))
    assert out.returncode == 2 and "cannot write to output folder" in out.stderr and "--out" in out.stderr
    assert "[###" not in out.stderr  # nothing trained


def test_interrupted_demo_leaves_no_partial_onnx(tmp_path, monkeypatch):
    """Ctrl-C at the worst moment: the ONNX bytes written, the rename not yet done."""
    import os

    from dsd_fx import cli

    real_replace = os.replace

    def interrupted(src, dst):
        if str(dst).endswith("model.onnx"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    assert cli.main(["demo", "--epochs", "1", "--out", str(tmp_path)]) == 130
    assert not list(tmp_path.glob("*.onnx*")) and not list(tmp_path.glob(".dsd_fx-*"))


def test_sigint_during_the_demo_leaves_only_whole_files(tmp_path):
    import signal
    import time

    import onnx

    proc = subprocess.Popen([sys.executable, "-m", "dsd_fx", "demo", "--epochs", "2", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        for line in proc.stderr:  # the re-dense bar's last line: export starts right after it
            if line.startswith("re-dense") or time.time() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode in (0, 130)
    assert not list(tmp_path.glob(".dsd_fx-*"))
    for f in tmp_path.glob("*.onnx"):
        onnx.checker.check_model(onnx.load(f))


def test_cli_demo_gpp_prunes_to_the_budget_and_proves_the_pruned_file(tmp_path):
    import json

    import onnx

    out = demo("--method", "gpp", "--quick", "--target", "0.6", "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pruned: same graph, smaller shapes: PROVEN" in out.stdout
    d = tmp_path / "out"
    for name in ("model.onnx", "reference.onnx"):
        onnx.checker.check_model(onnx.load(d / name))
    metrics = json.loads((d / "metrics.json").read_text())
    phases = metrics["phases"]
    assert phases[0]["phase"] == "dense" and phases[-1]["phase"] == "finetune"
    assert phases[-1]["params"] <= 0.6 * phases[0]["params"]  # the budget
    assert [p["params"] for p in phases] == sorted((p["params"] for p in phases), reverse=True)
    assert metrics["pruned_proof"] is True
    methods = {c["method"]: c for c in metrics["comparison"]}  # point 6's comparison, this seed
    assert list(methods) == ["gpp", "no push", "l1", "dense baseline"] and "comparison at the same budget" in out.stdout
    assert methods["gpp"]["params"] == phases[-1]["params"] and methods["dense baseline"]["params"] == phases[0]["params"]
    assert all(0 < c["params"] <= 0.6 * phases[0]["params"] for n, c in methods.items() if n != "dense baseline")
    assert (d / "gpp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ref, final = onnx.load(d / "reference.onnx"), onnx.load(d / "model.onnx")
    assert sorted(n.op_type for n in ref.graph.node) == sorted(n.op_type for n in final.graph.node)


def test_cli_demo_gpp_grows_inception_modules_first_and_proves_against_the_grown_model(tmp_path):
    import json

    import onnx

    out = demo("--method", "gpp", "--quick", "--target", "0.6", "--grow", "conv2,conv3", "--no-compare", "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pruned: same graph, smaller shapes: PROVEN" in out.stdout
    d = tmp_path / "out"
    metrics = json.loads((d / "metrics.json").read_text())
    phases = metrics["phases"]
    assert metrics["comparison"] == [] and "comparison at the same budget" not in out.stdout  # --no-compare
    assert [p["phase"] for p in phases[:2]] == ["dense", "grow (inception)"] and phases[1]["params"] > phases[0]["params"]
    assert phases[-1]["params"] <= 0.6 * phases[0]["params"]  # the budget is of the dense model
    ref, final = onnx.load(d / "reference.onnx"), onnx.load(d / "model.onnx")
    assert sum(1 for n in ref.graph.node if n.op_type == "Concat" and len(n.input) == 5) == 2  # two Inception modules
    assert sorted(n.op_type for n in ref.graph.node) == sorted(n.op_type for n in final.graph.node)


@pytest.mark.parametrize("args, words", [
    (["--method", "gpp", "--grow", "conv1"], "(40,) to (19,)"),  # said before the dense phase trains
    (["--method", "gpp", "--grow-how", "zeros"], "go with --grow LAYERS"),
    (["--quick", "--grow", "conv2", "--no-compare"], "--grow, --no-compare belong to --method gpp"),
    (["--quick", "--target", "0.6"], "--target belong to --method gpp"),
    (["--quick", "--step", "0.2", "--target", "0.6"], "--target, --step belong to --method gpp"),
    (["--quick", "--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--method", "gpp", "--quick", "--epochs", "-1"], "--epochs must be at least 1, got -1"),
    (["--method", "gpp", "--grow", "conv2", "--grow-width", "2.5"], "--grow-width must be a fraction"),
    (["--method", "gpp", "--target", "1.5"], "--target and --step must be fractions"),
    (["--method", "gpp", "--sparsity", "0.5"], "--sparsity and --pattern belong to the DSD run"),
])
def test_cli_demo_gpp_rejects_bad_options(args, words, tmp_path):
    out = demo(*args, "--out", str(tmp_path / "out"))
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr
