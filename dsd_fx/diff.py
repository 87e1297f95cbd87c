"""Show what a rewrite changed: code diff, structural node diff, DOT/SVG pictures, ONNX diff."""
from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import fx

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


# ---------------------------------------------------------------- structural matching


def _short(target: object) -> str:
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", None) or str(target)
    return name.split(".")[-1] if not name.startswith("<") else name


def fx_to_nx(gm: fx.GraphModule) -> nx.DiGraph:
    """Nodes labelled (op, target), with their display kind; edges carry the argument position."""
    g = nx.DiGraph()
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            kind = f"call_module {type(modules.get(node.target)).__name__}"
        elif node.op in ("call_function", "call_method"):
            kind = _short(node.target)
        else:
            kind = node.op
        label = (node.op, node.target if isinstance(node.target, str) else _short(node.target))
        g.add_node(node.name, label=label, kind=kind, op=node.op, target=label[1])
        for pos, inp in enumerate(node.all_input_nodes):
            g.add_edge(inp.name, node.name, pos=pos)
    return g


def _inputs(g: nx.DiGraph, n: str) -> list[str]:
    return [u for u, _ in sorted(g.in_edges(n), key=lambda e: g.edges[e]["pos"])]


def _users(g: nx.DiGraph, n: str) -> list[str]:
    return list(g.successors(n))


def match_graphs(a: nx.DiGraph, b: nx.DiGraph) -> tuple[dict[str, str], dict[str, str]]:
    """(matched, changed): node pairs a -> b that are the same node, or the same place with another op.

    Anchored on the graphs' inputs and outputs and propagated along edges by argument position
    (a structural match, not by name), then, for what is left, same label and same name.
    """
    matched: dict[str, str] = {}
    changed: dict[str, str] = {}
    used: set[str] = set()

    def pair(x: str, y: str, stack: list) -> None:
        if x in matched or x in changed or y in used:
            return
        if a.nodes[x]["label"] != b.nodes[y]["label"]:
            # a wrapper inserted in `b` (mask_mul(w, m) where w was): x is the wrapper's input
            for v in _inputs(b, y):
                if v not in used and b.nodes[v]["label"] == a.nodes[x]["label"]:
                    return pair(x, v, stack)
            # a wrapper removed from `a`: y is the wrapper's input
            for u in _inputs(a, x):
                if u not in matched and u not in changed and a.nodes[u]["label"] == b.nodes[y]["label"]:
                    return pair(u, y, stack)
            changed[x] = y
        else:
            matched[x] = y
        used.add(y)
        stack.append((x, y))

    stack: list[tuple[str, str]] = []
    for x in a.nodes:  # anchors: placeholders by target, the output node
        if a.nodes[x]["op"] in ("placeholder", "output", "input", "init"):
            for y in b.nodes:
                if b.nodes[y]["label"] == a.nodes[x]["label"] and y not in used:
                    pair(x, y, stack)
                    break
    while stack:
        x, y = stack.pop()
        ia, ib = _inputs(a, x), _inputs(b, y)
        if x in changed:  # a changed op: its first input is the data; others only where labels agree
            if ia and ib:
                pair(ia[0], ib[0], stack)
            for u in ia[1:]:
                for v in ib[1:]:
                    if v not in used and a.nodes[u]["label"] == b.nodes[v]["label"]:
                        pair(u, v, stack)
                        break
        else:
            for u, v in zip(ia, ib):
                pair(u, v, stack)
        # users: the same label first, else the user that reads it at the same argument position
        for u in _users(a, x):
            if u in matched or u in changed:
                continue
            pos = a.edges[x, u]["pos"]
            options = [v for v in _users(b, y) if v not in used]
            same = [v for v in options if b.nodes[v]["label"] == a.nodes[u]["label"]]
            at_pos = [v for v in options if b.edges[y, v]["pos"] == pos]
            if same or at_pos:
                pair(u, (same or at_pos)[0], stack)
    for x in a.nodes:  # leftovers: same label and name
        if x not in matched and x not in changed and x in b.nodes and x not in used and a.nodes[x]["label"] == b.nodes[x]["label"]:
            matched[x] = x
            used.add(x)
    return matched, changed


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
        lines = ["digraph dsd_fx_diff {", '  rankdir=TB; node [shape=box, style=filled, fontname="monospace", fontsize=10];']
        nodes, edges = self.union()
        for i, (label, color) in nodes.items():
            text = _dot_escape(label).replace("\n", "\\n")
            lines.append(f'  {i} [label="{text}", fillcolor={color}];')
        for u, v, removed in edges:
            lines.append(f"  {u} -> {v}" + (" [color=red, style=dashed];" if removed else ";"))
        lines.append("}")
        return "\n".join(lines)

    def to_png(self, path: str) -> str:
        """Draw the union graph with matplotlib (top to bottom in data-flow order): no Graphviz needed."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        nodes, edges = self.union()
        g = nx.DiGraph()
        g.add_nodes_from(nodes)
        g.add_edges_from((u, v) for u, v, _ in edges)
        order = {n: k for k, n in enumerate(nodes)}
        depth: dict[str, int] = {}
        for n in (nx.topological_sort(g) if nx.is_directed_acyclic_graph(g) else list(g)):
            depth[n] = max((depth.get(p, 0) + 1 for p in g.predecessors(n)), default=0)
        for n in g:  # inputs and weights sit just above their first reader, not all on the top row
            if g.in_degree(n) == 0 and g.out_degree(n):
                depth[n] = max(0, min(depth[s] for s in g.successors(n)) - 1)
        layers = [sorted((n for n in g if depth[n] == d), key=order.get) for d in range(max(depth.values(), default=0) + 1)]
        layers = [layer for layer in layers if layer]
        pos = {n: (k - (len(layer) - 1) / 2, -d) for d, layer in enumerate(layers) for k, n in enumerate(layer)}
        width = max(len(layer) for layer in layers)
        # capped: a large model's picture stays renderable (its labels then overlap; the DOT file has them all)
        fig, ax = plt.subplots(figsize=(min(60.0, max(4.0, 2.6 * width)), min(120.0, max(3.0, 0.75 * len(layers)))))
        for u, v, removed in edges:
            ax.annotate("", xy=pos[v], xytext=pos[u], arrowprops=dict(
                arrowstyle="-|>", color="red" if removed else "0.35", linestyle="--" if removed else "-",
                shrinkA=9, shrinkB=9, lw=0.8))
        for n, (label, color) in nodes.items():
            ax.text(*pos[n], label, ha="center", va="center", fontsize=7, family="monospace",
                    bbox=dict(boxstyle="round,pad=0.3", facecolor=color, edgecolor="0.3", lw=0.6))
        ax.set_xlim(-width / 2 - 0.2, width / 2 + 0.2)
        ax.set_ylim(-len(layers) + 0.4, 0.6)
        ax.axis("off")
        if self.title:
            ax.set_title(self.title, fontsize=9)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return path

    def write_pictures(self, prefix: str) -> list[str]:
        """Write PREFIX.dot, and PREFIX.svg and PREFIX.png with Graphviz's `dot`, or PREFIX.png with
        matplotlib where Graphviz is not installed; with neither, the DOT file and a log line."""
        os.makedirs(os.path.dirname(os.path.abspath(prefix)) or ".", exist_ok=True)
        written = [f"{prefix}.dot"]
        with open(written[0], "w") as f:
            f.write(self.to_dot() + "\n")
        exe = shutil.which("dot")
        if exe is not None:
            for fmt in ("svg", "png"):
                subprocess.run([exe, f"-T{fmt}", written[0], "-o", f"{prefix}.{fmt}"], check=True, capture_output=True)
                written.append(f"{prefix}.{fmt}")
        elif _has_matplotlib():
            written.append(self.to_png(f"{prefix}.png"))
        else:
            import logging

            logging.getLogger(__name__).warning(
                "Graphviz's `dot` is not installed: wrote %s only; render it with `dot -Tsvg %s -o %s.svg` "
                "(install graphviz, e.g. `apt-get install graphviz`)", written[0], written[0], prefix
            )
        return written


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _dot_escape(s: str) -> str:
    return str(s).replace("\\", "\\\\").replace('"', '\\"')


def _as_gm(model: torch.nn.Module) -> fx.GraphModule:
    return model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)


def diff(before: torch.nn.Module, after: torch.nn.Module, title: str = "") -> GraphDiff:
    """The diff of two GraphModules (or a model, traced, and a GraphModule)."""
    a, b = _as_gm(before), _as_gm(after)
    return diff_graphs(fx_to_nx(a), fx_to_nx(b), a.code, b.code, title)


def diff_graphs(ga: nx.DiGraph, gb: nx.DiGraph, code_a: str, code_b: str, title: str = "") -> GraphDiff:
    matched, changed = match_graphs(ga, gb)
    seen_b = set(matched.values()) | set(changed.values())
    d = GraphDiff(
        ga, gb, code_diff(code_a, code_b),
        added=[n for n in gb.nodes if n not in seen_b],
        removed=[n for n in ga.nodes if n not in matched and n not in changed],
        changed=list(changed.items()),
        title=title,
        matched=matched,
    )
    return d


# ---------------------------------------------------------------- ONNX


def diff_onnx(before, after, title: str = "") -> GraphDiff:
    """The diff of two ONNX models (ModelProto or file paths): text of the graphs, nodes and initializers."""
    import onnx

    from dsd_fx.export import onnx_to_nx

    a = onnx.load(before) if isinstance(before, (str, os.PathLike)) else before
    b = onnx.load(after) if isinstance(after, (str, os.PathLike)) else after
    return diff_graphs(onnx_to_nx(a), onnx_to_nx(b), _onnx_text(a), _onnx_text(b), title)


def _onnx_text(proto) -> str:
    """The graph in ONNX's text form, initializers listed by name, type and shape, not values."""
    import onnx
    from onnx import printer

    graph = onnx.GraphProto()
    graph.CopyFrom(proto.graph)
    inits = [f"initializer {i.name}: {onnx.TensorProto.DataType.Name(i.data_type)}{list(i.dims)}" for i in graph.initializer]
    del graph.initializer[:]
    return "\n".join(sorted(inits) + printer.to_text(graph).splitlines())
