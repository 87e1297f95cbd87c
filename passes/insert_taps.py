"""insert_taps: give the chosen layers a visible tap node that records their activations for the push loss."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Sequence

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from dsd_fx.op_table import function_row, module_row
from dsd_fx.tags import persist, tag, tag_of
from dsd_fx.taps import RECORDER, RECORDER_ROLE, TAP_ROLE, TapRecorder, recorder_of, tap

PASS = "insert_taps"  # the one spelling of this pass's name: recipes, strip_taps and the tags read it



def _classifier_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The input node of `node` if `node` is a Linear-like op, else None."""
    if node.op == "call_module":
        row = module_row(gm.get_submodule(node.target))
    else:
        row = function_row(node) if node.op == "call_function" else None
    i = row.classifier_input if row is not None else None
    if i is None:
        return None
    x = node.args[i] if len(node.args) > i else node.kwargs.get("input")
    return x if isinstance(x, fx.Node) else None


def _feeds_output(graph: fx.Graph) -> set[fx.Node]:
    """Every node the graph's output depends on."""
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    seen, stack = set(), list(out.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def final_classifier(gm: fx.GraphModule) -> tuple[fx.Node, fx.Node]:
    """(classifier, its input): the last Linear / F.linear node, in graph order, that the output depends on."""
    reach = _feeds_output(gm.graph)
    found = [(n, x) for n in gm.graph.nodes if n in reach and (x := _classifier_input(gm, n)) is not None]
    if not found:
        ops = sorted({str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "call_function")})[:12]
        raise ValueError(
            f"insert_taps: {type(gm).__name__} has no Linear / F.linear node that feeds its output, so there is "
            f"no final classifier whose input to tap by default (its ops: {', '.join(ops) or 'none'}). Name the "
            "layer(s) to tap: taps=['<node name or module pattern>']"
        )
    return found[-1]


def _key(node: fx.Node) -> str:
    return node.target if node.op == "call_module" else node.name


def _match(gm: fx.GraphModule, spec: str) -> list[fx.Node]:
    """The nodes `spec` names: every call of the modules an fnmatch pattern matches, else the node of that name."""
    hits = [n for n in gm.graph.nodes if n.op == "call_module" and fnmatch.fnmatchcase(n.target, spec)]
    if hits:
        return hits
    nodes = {n.name: n for n in gm.graph.nodes}
    if spec in nodes:
        return [nodes[spec]]
    names = sorted({n.target for n in gm.graph.nodes if n.op == "call_module"} | {n.name for n in gm.graph.nodes if n.op != "output"})
    near = difflib.get_close_matches(spec, names, n=3)
    hint = f" Did you mean {', '.join(map(repr, near))}?" if near else ""
    raise ValueError(
        f"insert_taps: tap {spec!r} names no node and matches no layer of {type(gm).__name__}.{hint} Give node "
        f"names (from gm.graph) or fnmatch patterns over module names; layers: {', '.join(names[:20])}"
    )


def plan_taps(gm: fx.GraphModule, taps: Sequence[str] | None) -> list[tuple[str, fx.Node]]:
    """[(tap name, node whose output is recorded)], checked: every error is raised here, before any change."""
    if isinstance(taps, str):
        raise TypeError(f"insert_taps: taps must be a list of names or patterns, got the string {taps!r}; write [{taps!r}]")
    targets = [final_classifier(gm)[1]] if taps is None else [n for spec in taps for n in _match(gm, spec)]
    if taps is not None and not taps:
        raise ValueError("insert_taps: taps=[] names no layer; pass None for the final classifier's input")
    if hasattr(gm, RECORDER) and recorder_of(gm) is None:
        raise ValueError(
            f"insert_taps: {type(gm).__name__} already has an attribute {RECORDER!r} that is not dsd_fx's tap "
            "recorder; rename it in the model"
        )
    plan: dict[fx.Node, str] = {}
    for node in targets:
        t = tag_of(node)
        if node.op == "output" or (t is not None and t["pass"] == PASS):
            what = "the graph's output node" if node.op == "output" else f"a tap node ({t['role']})"
            raise ValueError(f"insert_taps: {node.name!r} is {what}; tap a layer or value node instead")
        already = [u for u in node.users if (ut := tag_of(u)) is not None and (ut["pass"], ut["role"]) == (PASS, TAP_ROLE)]
        if already:
            raise ValueError(
                f"insert_taps: {node.name!r} is already tapped (tap {already[0].args[2]!r}); strip_taps(gm) first "
                "or choose another layer"
            )
        plan.setdefault(node, _key(node))
    # a module called more than once, or a name an earlier insert_taps took: the node name tells them apart
    keys = list(plan.values()) + list(recorder_of(gm).names if recorder_of(gm) is not None else ())
    return [(k if keys.count(k) == 1 else n.name, n) for n, k in plan.items()]


def _recorder_node(gm: fx.GraphModule) -> fx.Node:
    """The get_attr of the recorder: the one there is, or a new one right after the inputs."""
    g = gm.graph
    found = next((n for n in g.nodes if (t := tag_of(n)) is not None and t["role"] == RECORDER_ROLE), None)
    if found is not None:
        return found
    if recorder_of(gm) is None:
        gm.add_submodule(RECORDER, TapRecorder())
    inputs = [n for n in g.nodes if n.op == "placeholder"]
    where = g.inserting_after(inputs[-1]) if inputs else g.inserting_before(next(iter(g.nodes)))
    with where:
        return tag(g.create_node("get_attr", RECORDER), PASS, RECORDER_ROLE)


def insert_taps(gm: fx.GraphModule, taps: Sequence[str] | None = None) -> PassResult:
    """Record the activations of the chosen layers at every forward, through one visible tap node each.

    `taps`: fnmatch patterns over module names (``"features.*"``: every call of each matching module)
    or node names (``"relu_1"``); a tap records the output of the node it names. Default (None): the input of the final classifier, the
    last Linear / F.linear node in graph order that the output depends on.

    Before::

        fc1 = self.fc1(x);  x = None
        relu = torch.relu(fc1);  fc1 = None
        fc2 = self.fc2(relu);  relu = None
        return fc2

    After::

        _dsd_fx_taps = self._dsd_fx_taps
        fc1 = self.fc1(x);  x = None
        relu = torch.relu(fc1);  fc1 = None
        relu_tap = dsd_fx_taps_tap(_dsd_fx_taps, relu, 'relu');  _dsd_fx_taps = relu = None
        fc2 = self.fc2(relu_tap);  relu_tap = None
        return fc2

    The tap returns its input tensor itself, so outputs are bitwise unchanged; the recorder is a
    parameter-free submodule `_dsd_fx_taps` (see dsd_fx.taps), read by dsd_fx.push_loss. The tap
    and recorder nodes are tagged (roles "tap", "tap_recorder"); strip_taps removes them.
    """
    plan = plan_taps(gm, taps)
    if not plan:
        return PassResult(gm, modified=False)
    g = gm.graph
    rec_node = _recorder_node(gm)
    rec = recorder_of(gm)
    rec.names = rec.names + tuple(k for k, _ in plan)
    order = {n: i for i, n in enumerate(g.nodes)}
    for key, node in plan:
        # after both the tapped value and the recorder: an input is tapped after the recorder's read
        point = node if order[node] > order[rec_node] else rec_node
        with g.inserting_after(point):
            new = g.create_node("call_function", tap, (rec_node, node, key), name=f"{key}_tap")
        tag(new, PASS, TAP_ROLE, tap=key)
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
    persist(gm)  # keep the records' copy of the tags in step (see dsd_fx.tags.persist)
    return PassResult(gm, modified=bool(plan))
