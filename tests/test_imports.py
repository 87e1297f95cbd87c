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
