"""Pictures of a graph diff: DOT text, SVG/PNG through Graphviz's `dot`, or a PNG drawn with matplotlib.

A picture is a diagnostic: every failure to draw or write one is logged, naming the file and
the cause, and never raised. Nodes are {id: (label, colour)}, edges [(src, dst, removed)].
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
from typing import Mapping, Sequence

import networkx as nx

log = logging.getLogger(__name__)

Nodes = Mapping[str, tuple[str, str]]
Edges = Sequence[tuple[str, str, bool]]

DOT_TIMEOUT_S = 120.0


def _dot_escape(s: str) -> str:
    return str(s).replace("\\", "\\\\").replace('"', '\\"')


def to_dot(nodes: Nodes, edges: Edges) -> str:
    """The graph as DOT: each node filled with its colour, removed edges red and dashed."""
    lines = ["digraph dsd_fx_diff {", '  rankdir=TB; node [shape=box, style=filled, fontname="monospace", fontsize=10];']
    for i, (label, color) in nodes.items():
        text = _dot_escape(label).replace("\n", "\\n")
        lines.append(f'  {i} [label="{text}", fillcolor={color}];')
    for u, v, removed in edges:
        lines.append(f"  {u} -> {v}" + (" [color=red, style=dashed];" if removed else ";"))
    lines.append("}")
    return "\n".join(lines)


def _layout(nodes: Nodes, edges: Edges) -> tuple[dict[str, tuple[float, float]], int, int]:
    """Positions top to bottom in data-flow order, and the width and depth of the layout."""
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
    return pos, max((len(layer) for layer in layers), default=1), len(layers)


def draw_png(nodes: Nodes, edges: Edges, path: str, title: str = "") -> str:
    """Draw the graph with matplotlib's object API and Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pos, width, height = _layout(nodes, edges)
    # capped: a large model's picture stays renderable (its labels then overlap; the DOT file has them all)
    fig = Figure(figsize=(min(60.0, max(4.0, 2.6 * width)), min(120.0, max(3.0, 0.75 * height))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for u, v, removed in edges:
        ax.annotate("", xy=pos[v], xytext=pos[u], arrowprops=dict(
            arrowstyle="-|>", color="red" if removed else "0.35", linestyle="--" if removed else "-",
            shrinkA=9, shrinkB=9, lw=0.8))
    for n, (label, color) in nodes.items():
        ax.text(*pos[n], label, ha="center", va="center", fontsize=7, family="monospace",
                bbox=dict(boxstyle="round,pad=0.3", facecolor=color, edgecolor="0.3", lw=0.6))
    ax.set_xlim(-width / 2 - 0.2, width / 2 + 0.2)
    ax.set_ylim(-height + 0.4, 0.6)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _run_dot(exe: str, source: str, fmt: str, target: str) -> bool:
    try:
        subprocess.run([exe, f"-T{fmt}", source, "-o", target], check=True, capture_output=True, timeout=DOT_TIMEOUT_S)
    except subprocess.CalledProcessError as err:
        cause = (err.stderr or b"").decode(errors="replace").strip().splitlines()
        log.warning("could not draw %s: `%s` exited with status %d%s", target, exe, err.returncode,
                    f": {cause[0]}" if cause else "")
        return False
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("could not draw %s with `%s`: %s: %s", target, exe, type(err).__name__, err)
        return False
    return True


def _try_png(nodes: Nodes, edges: Edges, path: str, title: str) -> bool:
    try:
        draw_png(nodes, edges, path, title)
    except Exception as err:  # noqa: BLE001 - a picture is a diagnostic: log it, never fail the caller
        log.warning("could not draw %s with matplotlib: %s: %s", path, type(err).__name__, err)
        return False
    return True


def write_pictures(nodes: Nodes, edges: Edges, prefix: str, title: str = "") -> list[str]:
    """Write PREFIX.dot, and PREFIX.svg and PREFIX.png with Graphviz's `dot`, or PREFIX.png with
    matplotlib where Graphviz is not installed or fails; with neither, the DOT file and a log line.

    Returns the files written. Never raises for a picture: each failure is a warning on this
    module's logger naming the file and the cause.
    """
    source = f"{prefix}.dot"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(prefix)) or ".", exist_ok=True)
        with open(source, "w") as f:
            f.write(to_dot(nodes, edges) + "\n")
    except OSError as err:
        log.warning("could not write %s: %s", source, err)
        return []
    written = [source]
    exe = shutil.which("dot")
    if exe is not None:
        for fmt in ("svg", "png"):
            if _run_dot(exe, source, fmt, f"{prefix}.{fmt}"):
                written.append(f"{prefix}.{fmt}")
    if f"{prefix}.png" in written:
        return written
    if _has_matplotlib():
        if _try_png(nodes, edges, f"{prefix}.png", title):
            written.append(f"{prefix}.png")
    elif exe is None:
        log.warning(
            "Graphviz's `dot` is not installed: wrote %s only; render it with `dot -Tsvg %s -o %s.svg` "
            "(install graphviz, e.g. `apt-get install graphviz`)", source, source, prefix
        )
    return written
