"""fx and ONNX graphs as networkx graphs, and structural node matching: a leaf, importing nothing of dsd_fx."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import networkx as nx

if TYPE_CHECKING:
    import onnx
    from torch import fx

__all__ = ["fx_to_nx", "onnx_to_nx", "match_graphs", "onnx_op", "onnx_initializers", "load_onnx"]

# ---------------------------------------------------------------- fx


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


# ---------------------------------------------------------------- ONNX


def load_onnx(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """A ModelProto as it is, or the model in the file at a path; a file that holds no ONNX model
    (garbage, or empty: protobuf parses 0 bytes as an empty ModelProto) is a ValueError naming it."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"expected an onnx.ModelProto or a path to an .onnx file, got {type(model).__name__}")
    if not os.path.isfile(model):
        raise FileNotFoundError(f"no such file: {os.fspath(model)}")
    try:
        proto = onnx.load(model)
    except Exception as err:  # noqa: BLE001 - whatever protobuf raises on bytes that are not a model
        raise ValueError(f"{os.fspath(model)} is not an ONNX model: {type(err).__name__}: {err}") from err
    if not proto.ir_version or not proto.HasField("graph"):  # an ONNX model always records its IR version
        what = "it is empty (0 bytes)" if os.path.getsize(model) == 0 else "it holds no IR version or graph"
        raise ValueError(f"{os.fspath(model)} is not an ONNX model: {what}")
    return proto


def onnx_op(node: onnx.NodeProto) -> str:
    """The op type, prefixed by its domain where that is not the default one."""
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _attr_label(node: onnx.NodeProto) -> tuple:
    from onnx import helper

    out = []
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode(errors="replace")
        elif isinstance(v, (list, tuple)):
            v = tuple(x.decode(errors="replace") if isinstance(x, bytes) else x for x in v)
        elif not isinstance(v, (int, float, str)):
            v = type(v).__name__  # tensors and graphs: compared by kind only
        out.append((a.name, v))
    return tuple(sorted(out))


def onnx_initializers(proto: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """{name: (dims, dtype name, bytes)} of the graph's initializers."""
    from onnx import TensorProto, numpy_helper

    out = {}
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        out[init.name] = (tuple(init.dims), TensorProto.DataType.Name(init.data_type), int(arr.nbytes))
    return out


def onnx_to_nx(proto: onnx.ModelProto) -> nx.DiGraph:
    """An ONNX graph as networkx, for the isomorphism check and for diffs.

    Nodes: ops labelled by op type and attributes, graph inputs by position, initializers by name,
    shape and dtype, outputs by position. Edges carry the argument positions (`slots`; `pos` is
    the first), so wiring counts, not just node labels.
    """
    g = nx.DiGraph()
    producer: dict[str, str] = {}
    for i, v in enumerate(proto.graph.input):
        g.add_node(f"input:{v.name}", label=("input", i), kind="input", op="input")
        producer[v.name] = f"input:{v.name}"
    for name, (dims, dtype, _) in onnx_initializers(proto).items():
        g.add_node(f"init:{name}", label=("init", name, dims, dtype), kind="initializer", op="init")
        producer[name] = f"init:{name}"
    keys = []
    for k, node in enumerate(proto.graph.node):
        key = node.name or f"{node.op_type}_{k}"
        keys.append(key)
        g.add_node(key, label=("op", onnx_op(node), _attr_label(node)), kind=onnx_op(node), op="node")
        for out in node.output:
            producer[out] = key
    for key, node in zip(keys, proto.graph.node):
        for slot, name in enumerate(node.input):
            if name and name in producer:
                src = producer[name]
                if g.has_edge(src, key):
                    g.edges[src, key]["slots"] += (slot,)
                else:
                    g.add_edge(src, key, slots=(slot,), pos=slot)
    for i, v in enumerate(proto.graph.output):
        g.add_node(f"output:{i}", label=("output", i), kind="output", op="output")
        if v.name in producer:
            g.add_edge(producer[v.name], f"output:{i}", slots=(0,), pos=0)
    return g


# ---------------------------------------------------------------- structural matching

_ANCHORS = ("placeholder", "output", "input", "init")


def _inputs(g: nx.DiGraph, n: str) -> list[str]:
    return [u for u, _ in sorted(g.in_edges(n), key=lambda e: g.edges[e]["pos"])]


class _Matcher:
    """The state of one match: pairs found so far and the frontier still to walk."""

    def __init__(self, a: nx.DiGraph, b: nx.DiGraph) -> None:
        self.a, self.b = a, b
        self.matched: dict[str, str] = {}
        self.changed: dict[str, str] = {}
        self.used: set[str] = set()
        self.stack: list[tuple[str, str]] = []

    def done(self, x: str) -> bool:
        return x in self.matched or x in self.changed

    def same(self, x: str, y: str) -> bool:
        return self.a.nodes[x]["label"] == self.b.nodes[y]["label"]

    def pair(self, x: str, y: str) -> None:
        if self.done(x) or y in self.used:
            return
        if not self.same(x, y):
            # a wrapper inserted in `b` (mask_mul(w, m) where w was): x is the wrapper's input
            for v in _inputs(self.b, y):
                if v not in self.used and self.same(x, v):
                    return self.pair(x, v)
            # a wrapper removed from `a`: y is the wrapper's input
            for u in _inputs(self.a, x):
                if not self.done(u) and self.same(u, y):
                    return self.pair(u, y)
            self.changed[x] = y
        else:
            self.matched[x] = y
        self.used.add(y)
        self.stack.append((x, y))

    def walk_inputs(self, x: str, y: str) -> None:
        ia, ib = _inputs(self.a, x), _inputs(self.b, y)
        if x not in self.changed:
            for u, v in zip(ia, ib):
                self.pair(u, v)
            return
        # a changed op: its first input is the data; others only where labels agree
        if ia and ib:
            self.pair(ia[0], ib[0])
        for u in ia[1:]:
            for v in ib[1:]:
                if v not in self.used and self.same(u, v):
                    self.pair(u, v)
                    break

    def walk_users(self, x: str, y: str) -> None:
        # the same label first, else the user that reads it at the same argument position
        for u in self.a.successors(x):
            if self.done(u):
                continue
            pos = self.a.edges[x, u]["pos"]
            options = [v for v in self.b.successors(y) if v not in self.used]
            same = [v for v in options if self.same(u, v)]
            at_pos = [v for v in options if self.b.edges[y, v]["pos"] == pos]
            if same or at_pos:
                self.pair(u, (same or at_pos)[0])

    def run(self) -> tuple[dict[str, str], dict[str, str]]:
        a, b = self.a, self.b
        for x in a.nodes:  # anchors: placeholders by target, the output node
            if a.nodes[x]["op"] in _ANCHORS:
                y = next((y for y in b.nodes if y not in self.used and self.same(x, y)), None)
                if y is not None:
                    self.pair(x, y)
        while self.stack:
            x, y = self.stack.pop()
            self.walk_inputs(x, y)
            self.walk_users(x, y)
        for x in a.nodes:  # leftovers: same label and name
            if not self.done(x) and x in b.nodes and x not in self.used and self.same(x, x):
                self.matched[x] = x
                self.used.add(x)
        return self.matched, self.changed


def match_graphs(a: nx.DiGraph, b: nx.DiGraph) -> tuple[dict[str, str], dict[str, str]]:
    """(matched, changed): node pairs a -> b that are the same node, or the same place with another op.

    Anchored on the graphs' inputs and outputs and propagated along edges by argument position
    (a structural match, not by name), then, for what is left, same label and same name.
    Nodes need a `label` and an `op`, edges a `pos`: what `fx_to_nx` and `onnx_to_nx` give.
    """
    return _Matcher(a, b).run()
