"""The wheel users get holds every source file of dsd_fx/ and passes/ (as dsd_fx/passes), whatever CI's
editable install sees: packages are discovered, never listed by hand."""
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_holds_every_source_file(tmp_path):
    # --no-build-isolation: no network, the installed setuptools builds it
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("dsd_fx-*.whl")
    held = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "dsd_fx").rglob("*.py")}
    expected |= {"dsd_fx/passes/" + p.relative_to(ROOT / "passes").as_posix() for p in (ROOT / "passes").rglob("*.py")}
    assert "dsd_fx/passes/fold_masks.py" in expected and "dsd_fx/sparse/masks.py" in expected
    assert held == expected, f"missing {sorted(expected - held)}, unexpected {sorted(held - expected)}"
