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
    assert "zero overhead: PROVEN" in out.stdout


def test_cli_demo(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dsd_fx", "demo", "--epochs", "1", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "zero overhead: PROVEN" in out.stdout
    for phase in ("dense", "sparse", "re-dense"):
        assert f"\n{phase} " in out.stdout
    assert (tmp_path / "out" / "model.onnx").stat().st_size > 0
    assert (tmp_path / "out" / "zero_overhead.txt").read_text().startswith("check")


def test_cli_rejects_zero_epochs():
    out = subprocess.run([sys.executable, "-m", "dsd_fx", "demo", "--epochs", "0"], capture_output=True, text=True)
    assert out.returncode == 2 and "--epochs must be at least 1" in out.stderr
