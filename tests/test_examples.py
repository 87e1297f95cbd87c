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
    assert "zero overhead: PROVEN" in out.stdout


def demo(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dsd_fx", "demo", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_demo_writes_every_output(tmp_path):
    import json

    import onnx

    out = demo("--quick", "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr[-3000:]
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
    # the same seed gives the same run
    again = demo("--quick", "--out", str(tmp_path / "again"))
    redo = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert [e["loss"] for e in redo["epochs"]] == [e["loss"] for e in metrics["epochs"]], again.stderr[-2000:]


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
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--sparsity", "1.5"], "--sparsity must be in (0, 1), got 1.5"),
        (["--method", "sr-ste"], "--method sr-ste needs --pattern N:M"),
    ],
)
def test_cli_demo_rejects_bad_options(args, words, tmp_path):
    out = demo(*args, "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and words in out.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


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
