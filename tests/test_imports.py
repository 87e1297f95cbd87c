"""The package's import graph has no cycle, function-level imports included (DESIGN: nothing lower
imports anything higher)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for folder, package in (("dsd_fx", "dsd_fx"), ("passes", "dsd_fx.passes")):
        for path in (ROOT / folder).glob("*.py"):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


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
        found |= {t for t in targets if t in known and t != name and not t.endswith("__init__") and t not in ("dsd_fx", "dsd_fx.passes")}
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
