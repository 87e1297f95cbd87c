"""dsd-fx demo --task lm: every output from one short run, the table's numbers from metrics.json, the flags refused before training."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers", minversion="5")


def demo(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dsd_fx", "demo", *args], capture_output=True, text=True, timeout=timeout)


def test_lm_demo_writes_every_output(tmp_path):
    import onnx

    out = demo("--task", "lm", "--quick", "--steps", "20", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LlamaForCausalLM (2 layers" in out.stderr and "standard library" in out.stderr
    assert "zero overhead: PROVEN" in out.stdout
    for phase in ("dense", "sparse", "re-dense"):
        assert f"\n{phase} " in out.stdout and "[###" in out.stderr
    for name in ("model.onnx", "reference.onnx"):
        onnx.checker.check_model(onnx.load(tmp_path / name))
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["zero_overhead"] is True and metrics["args"]["steps"] == 20
    phases = metrics["phases"]
    assert [p["phase"] for p in phases] == ["dense", "sparse", "re-dense"] and [p["rounds"] for p in phases] == [20] * 3
    assert phases[1]["sparsity"] > 0.4 and phases[2]["sparsity"] == 0.0  # the embedding stays dense: a bit under 50%
    assert phases[2]["lr"] == pytest.approx(phases[0]["lr"] * 0.1)
    dsd, base = metrics["curves"]["dsd"], metrics["curves"]["baseline"]
    assert dsd[0] == base[0] and dsd[1] != base[1]  # one run until the fork, then two
    for point in dsd + base:
        assert point["bpb"] == pytest.approx(point["val_loss"] / 0.6931471805599453)
    final = metrics["final"]
    assert final["dsd_bpb"] == dsd[-1]["bpb"] and final["baseline_bpb"] == base[-1]["bpb"]
    assert f"D -> S -> D {final['dsd_bpb']:.3f}, dense baseline {final['baseline_bpb']:.3f}" in out.stdout
    assert metrics["corpus"]["train_bytes"] == 131072 and metrics["corpus"]["python"].startswith(f"{sys.version_info[0]}.")


@pytest.mark.parametrize("args,message", [
    (["--task", "lm", "--epochs", "3"], "--epochs belongs to --task classify"),
    (["--task", "lm", "--method", "gpp"], "--method gpp"),
    (["--task", "lm", "--grow", "conv2"], "--grow belong to --method gpp"),
    (["--task", "lm", "--criterion", "wanda", "--pattern", "2:4", "--method", "sr-ste"], "--criterion wanda computes the mask once"),
    (["--task", "lm", "--steps", "5"], "--steps must be at least"),
    (["--steps", "100"], "--steps belong to --task lm"),
    (["--task", "lm", "--sparsity", "1.5"], "--sparsity must be in"),
])
def test_bad_flags_are_refused_before_training(args, message, tmp_path, capsys):
    from dsd_fx.cli import main

    assert main(["demo", *args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()
