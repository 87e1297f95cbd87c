"""The package's import graph has no cycle in any folder, function-level imports included (DESIGN:
nothing lower imports anything higher), and every folder's __init__ says what lives there and
re-exports its names."""
import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for folder, package in (("dsd_fx", "dsd_fx"), ("passes", "dsd_fx.passes")):
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            out[".".join((package,) + (parts[:-1] if parts[-1] == "__init__" else parts))] = path
    return out


FOLDERS = sorted(m for m, p in _modules().items() if p.stem == "__init__" and m != "dsd_fx")


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        found |= {t for t in targets if t in known and t != name and not t.endswith("__init__") and t != "dsd_fx"}
    return found


def test_no_import_cycle():
    modules = _modules()
    edges = {m: _imports(m, p, set(modules)) for m, p in modules.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            assert state.get(t) != 1, "import cycle: " + " -> ".join(stack[stack.index(t):] + [t])
            if t not in state:
                visit(t)
        state[m] = 2
        stack.pop()

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_walk_sees_every_folder():
    folders = {p.parent for p in (ROOT / "dsd_fx").rglob("*.py")} | {p.parent for p in (ROOT / "passes").rglob("*.py")}
    assert {p.parent for p in _modules().values()} == folders
    assert {"dsd_fx.sparse.masks", "dsd_fx.channels.groups", "dsd_fx.passes.fold_masks"} <= set(_modules())


@pytest.mark.parametrize("package", [f for f in FOLDERS if f != "dsd_fx.passes"])
def test_folder_init_says_what_lives_there_and_reexports_it(package):
    module = importlib.import_module(package)
    assert module.__doc__ and len(module.__doc__.strip().splitlines()) <= 8
    assert module.__all__, f"{package} re-exports nothing"
    for name in module.__all__:
        value = getattr(module, name)
        assert not isinstance(value, type(module)), f"{package}.{name} is a module and a re-exported name"
        assert getattr(value, "__module__", package).startswith(package), f"{package}.{name} comes from elsewhere"


def test_no_public_name_is_also_a_module():
    for package in ["dsd_fx"] + FOLDERS:
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", ()):
            assert f"{package}.{name}" not in _modules(), f"{package}.{name} names a module and a re-export"


def test_one_of_each_helper():
    from dsd_fx.infra.calls import as_args, eval_mode
    from dsd_fx.infra.options import fraction

    import torch

    net = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.BatchNorm1d(2))
    net[1].train(False)
    with eval_mode(net, no_grad=True) as m:
        assert m is net and not net.training and not torch.is_grad_enabled()
    assert net.training and not net[1].training  # each submodule's own mode back
    assert as_args(3) == (3,) and as_args((1, 2)) == (1, 2)
    with pytest.raises(TypeError, match="channel analysis needs example_args"):
        as_args(None, "channel analysis")
    assert fraction(0.5, "x") == 0.5 and fraction(0, "x", zero=True) == 0.0
    for bad, zero in ((0, False), (1, True), (True, False), ("0.5", False)):
        with pytest.raises(ValueError, match="x must be a fraction"):
            fraction(bad, "x", zero=zero)
    for name in ("eval_mode", "as_args", "option_names", "_fraction", "_refuse_tied", "ort_session", "ort_feeds"):
        defining = [m for m, p in _modules().items() if f"def {name}(" in p.read_text()]
        assert len(defining) <= 1 or name in ("_fraction", "_refuse_tied"), (name, defining)
