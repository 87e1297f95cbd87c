"""Show what a rewrite changed: code diff, structural node diff, DOT/SVG pictures, ONNX diff."""
from __future__ import annotations

import difflib
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import networkx as nx
import torch
from torch import fx

from dsd_fx.diagnostics import draw
from dsd_fx.diagnostics.graphs import fx_to_nx, load_onnx, match_graphs, onnx_to_nx

if TYPE_CHECKING:
    import onnx

_COLORS = {"+": "\033[32m", "-": "\033[31m", "@": "\033[36m"}


def _color_enabled() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def colorize(text: str) -> str:
    out = []
    for line in text.splitlines():
        c = _COLORS.get(line[:1]) if not line.startswith(("+++", "---")) else "\033[1m"
        out.append(f"{c}{line}\033[0m" if c else line)
    return "\n".join(out)


def code_diff(before: str, after: str, name_before: str = "before", name_after: str = "after") -> str:
    lines = difflib.unified_diff(
        before.strip().splitlines(), after.strip().splitlines(), name_before, name_after, lineterm=""
    )
    return "\n".join(lines)


@dataclass
class GraphDiff:
    """The change between two graphs: `str()` is the unified code diff; nodes added, removed, changed."""

    before: nx.DiGraph
    after: nx.DiGraph
    code: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[tuple[str, str]] = field(default_factory=list)
    title: str = ""
    matched: dict[str, str] = field(default_factory=dict)

    @property
    def counts(self) -> Counter:
        c: Counter = Counter()
        for n in self.added:
            c[f"+{self.after.nodes[n]['kind']}"] += 1
        for n in self.removed:
            c[f"-{self.before.nodes[n]['kind']}"] += 1
        for x, y in self.changed:
            c[f"{self.before.nodes[x]['op']} -> {self.after.nodes[y]['op']}"] += 1
        return c

    @property
    def summary(self) -> str:
        parts = []
        for key, count in sorted(self.counts.items(), key=lambda kv: (kv[0][0] not in "+-", kv[0])):
            parts.append(f"{key[0]}{count} {key[1:]}" if key[0] in "+-" else f"{count} {key}")
        return ", ".join(parts) or "no change"

    def render(self, color: bool | None = None) -> str:
        head = f"*** {self.title} ***\n" if self.title else ""
        body = self.code or "(the generated code is identical)"
        text = f"{head}{body}\n# nodes: {self.summary}"
        return colorize(text) if (_color_enabled() if color is None else color) else text

    def __str__(self) -> str:
        return self.render()

    def union(self) -> tuple[dict[str, tuple[str, str]], list[tuple[str, str, bool]]]:
        """Both graphs in one: {id: (label, colour)} and [(src, dst, removed_edge)].

        Added nodes are green, removed red, changed yellow, the rest white.
        """
        added, changed_after = set(self.added), {y for _, y in self.changed}
        ids: dict[tuple[str, str], str] = {}
        nodes: dict[str, tuple[str, str]] = {}
        for n in self.after.nodes:
            ids[("a", n)] = f"a_{len(ids)}"
            color = "palegreen" if n in added else "khaki" if n in changed_after else "white"
            nodes[ids[("a", n)]] = (f"{n}\n{self.after.nodes[n]['kind']}", color)
        for n in self.removed:
            ids[("b", n)] = f"b_{len(ids)}"
            nodes[ids[("b", n)]] = (f"{n}\n{self.before.nodes[n]['kind']}", "lightcoral")
        edges = [(ids[("a", u)], ids[("a", v)], False) for u, v in self.after.edges]
        inverse = {x: ("a", y) for x, y in [*self.matched.items(), *self.changed]}
        for u, v in self.before.edges:
            if u in self.removed or v in self.removed:
                src = ids.get(("b", u)) or ids.get(inverse.get(u, ("", "")))
                dst = ids.get(("b", v)) or ids.get(inverse.get(v, ("", "")))
                if src and dst:
                    edges.append((src, dst, True))
        return nodes, edges

    def to_dot(self) -> str:
        """The union of both graphs as DOT: added nodes green, removed red, changed yellow, the rest white."""
        return draw.to_dot(*self.union())

    def to_png(self, path: str) -> str:
        """Draw the union graph with matplotlib (top to bottom in data-flow order): no Graphviz needed."""
        return draw.draw_png(*self.union(), path, self.title)

    def write_pictures(self, prefix: str) -> list[str]:
        """Write PREFIX.dot, and PREFIX.svg and PREFIX.png with Graphviz's `dot`, or PREFIX.png with
        matplotlib where Graphviz is not installed; returns the files written. A picture that cannot
        be drawn or written is a warning on `dsd_fx.diagnostics.draw`'s logger, naming the file and the cause: never raised."""
        return draw.write_pictures(*self.union(), prefix, self.title)


def _as_gm(model: torch.nn.Module) -> fx.GraphModule:
    return model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)


def diff(before: torch.nn.Module, after: torch.nn.Module, title: str = "") -> GraphDiff:
    """The diff of two GraphModules (or a model, traced, and a GraphModule)."""
    a, b = _as_gm(before), _as_gm(after)
    return diff_graphs(fx_to_nx(a), fx_to_nx(b), a.code, b.code, title)


def diff_graphs(ga: nx.DiGraph, gb: nx.DiGraph, code_a: str, code_b: str, title: str = "") -> GraphDiff:
    """The diff of two graphs already converted (`dsd_fx.diagnostics.graphs.fx_to_nx` or `onnx_to_nx`) and their text."""
    matched, changed = match_graphs(ga, gb)
    seen_b = set(matched.values()) | set(changed.values())
    return GraphDiff(
        ga, gb, code_diff(code_a, code_b),
        added=[n for n in gb.nodes if n not in seen_b],
        removed=[n for n in ga.nodes if n not in matched and n not in changed],
        changed=list(changed.items()),
        title=title,
        matched=matched,
    )


# ---------------------------------------------------------------- ONNX


def diff_onnx(before: onnx.ModelProto | str | os.PathLike, after: onnx.ModelProto | str | os.PathLike, title: str = "") -> GraphDiff:
    """The diff of two ONNX models (ModelProto or file paths): text of the graphs, nodes and initializers."""
    a, b = load_onnx(before), load_onnx(after)  # an empty or garbage file: a ValueError naming it
    return diff_graphs(onnx_to_nx(a), onnx_to_nx(b), _onnx_text(a), _onnx_text(b), title)


def _onnx_text(proto: onnx.ModelProto) -> str:
    """The graph in ONNX's text form, initializers listed by name, type and shape, not values."""
    import onnx
    from onnx import printer

    graph = onnx.GraphProto()
    graph.CopyFrom(proto.graph)
    inits = [f"initializer {i.name}: {onnx.TensorProto.DataType.Name(i.data_type)}{list(i.dims)}" for i in graph.initializer]
    del graph.initializer[:]
    return "\n".join(sorted(inits) + printer.to_text(graph).splitlines())
