"""Channel groups: which channels of which layers must be removed together (structural pruning)."""
from __future__ import annotations

import contextlib
import io
import re
import sys
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from dsd_fx.infra.calls import as_args, eval_mode
from dsd_fx.infra.graph_capture import capture
from dsd_fx.channels.flow import Propagation
from dsd_fx.channels.layout import FlowState, Member


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that live or die together: removing group channel c removes, at every member, the
    slice `member.positions([c])` of `member.layer`'s `member.tensor` along `member.dim`.

    producers: the layers whose output channels the group is (an Embedding, Linear or Conv).
    blocked_by: why the group may not be pruned (the node that stopped it); empty if prunable.
    """

    index: int
    size: int
    members: tuple[Member, ...]
    producers: tuple[str, ...]
    blocked_by: tuple[str, ...] = ()

    @property
    def prunable(self) -> bool:
        return not self.blocked_by and self.size > 1

    @property
    def name(self) -> str:
        return self.producers[0] if self.producers else f"group{self.index}"

    def describe(self) -> str:
        where = ", ".join(f"{m.path}[{m.dim}]" + (f"+{m.offset}" if m.offset else "")
                          + (f"x{m.repeat}" if m.repeat > 1 else "") for m in self.members)
        state = "prunable" if self.prunable else "blocked: " + "; ".join(dict.fromkeys(self.blocked_by)) if self.blocked_by else "size 1"
        return f"group {self.index} '{self.name}' ({self.size} channels, {state}): {where}"


def propagate_shapes(gm: fx.GraphModule, example_args: tuple) -> None:
    """Record every node's output shape (node.meta['tensor_meta']) by one forward in eval mode.

    `gm` must be a capture (its modules are shells: the user's modules keep their mode)."""
    printed = io.StringIO()
    with eval_mode(gm, no_grad=True):
        try:
            # ShapeProp prints the traceback of a failing node to stderr before it raises: held back
            # here, since the ValueError below says what failed (and where) in one line
            with contextlib.redirect_stderr(printed):
                ShapeProp(gm).propagate(*example_args)
        except Exception as err:  # noqa: BLE001 - the user's input: said as such
            node = re.match(r"ShapeProp error for: node=%(\S+)", str(err))
            cause = err.__cause__ if node and err.__cause__ is not None else err
            shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in example_args]
            at = f" (at node '{node[1]}')" if node else ""
            raise ValueError(f"channel analysis: {type(gm).__name__} does not run on example_args {shapes}{at}: "
                             f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}; "
                             "pass example inputs its forward accepts") from err
    sys.stderr.write(printed.getvalue())  # what the model itself wrote to stderr, once it ran


def _graph(state: FlowState) -> nx.Graph:
    """Nodes: ("atom", a) channel spaces and ("member", Member) slots; edges tie their channels."""
    g = nx.Graph()
    for a in range(len(state.sizes)):
        g.add_node(("atom", a))
    for a, m in state.members:
        g.add_edge(("atom", a), ("member", m))
    for a, b in state.ties:
        g.add_edge(("atom", a), ("atom", b))
    return g


def _overlaps(groups: list[ChannelGroup]) -> dict[int, str]:
    """Groups that claim the same indices of one tensor dim (a layer reached twice, differently)."""
    spans: dict[tuple, list[tuple[int, int, int]]] = {}
    for g in groups:
        for m in g.members:  # a member owns one contiguous span of its dim
            spans.setdefault((m.layer, m.tensor, m.dim), []).append((m.offset * m.repeat, (m.offset + m.length) * m.repeat, g.index))
    clash: dict[int, str] = {}
    for (layer, tensor, dim), found in spans.items():
        reach, owner = -1, None  # the farthest end so far, and whose: a span starting before it overlaps that one
        for lo, hi, g in sorted(found):
            if lo < reach and g != owner:
                why = f"layer '{layer}': index {lo} of {tensor or 'its count'} dim {dim} is in two channel groups"
                clash[g] = clash[owner] = why
            if hi > reach:
                reach, owner = hi, g
    return clash


def groups_of(gm: fx.GraphModule) -> list[ChannelGroup]:
    """The channel groups of a shape-propagated capture, in graph order of their first producer."""
    state = Propagation(gm).run()
    made = {a for a, m in state.members if m.role == "out"}  # atoms a layer makes (not a cat's untracked part)
    g = _graph(state)
    out: list[ChannelGroup] = []
    for comp in nx.connected_components(g):
        atoms = sorted(a for kind, a in comp if kind == "atom")
        members = sorted((m for kind, m in comp if kind == "member"), key=lambda m: (m.role != "out", m.layer, m.tensor, m.offset))
        blocked = [r for a in atoms for r in state.blocked.get(a, [])]
        sizes = {state.sizes[a] for a in atoms}
        if len(sizes) > 1:
            blocked.append(f"channel spaces of sizes {sorted(sizes)} are tied")
        producers = tuple(dict.fromkeys(state.producers[a] for a in atoms if a in made))
        out.append(ChannelGroup(atoms[0], min(sizes), tuple(members), producers, tuple(dict.fromkeys(blocked))))
    out.sort(key=lambda grp: grp.index)
    out = [ChannelGroup(k, grp.size, grp.members, grp.producers, grp.blocked_by) for k, grp in enumerate(out)]
    clash = _overlaps(out)
    return [ChannelGroup(grp.index, grp.size, grp.members, grp.producers, grp.blocked_by + ((clash[grp.index],) if grp.index in clash else ()))
            for grp in out]


def channel_groups(model: torch.nn.Module, example_args: Any, *, concrete_args: dict | None = None) -> list[ChannelGroup]:
    """Trace `model` (any GraphModule accepted), propagate shapes through `example_args` and
    return its channel groups: which output channels of which layers, with the norms and
    consumers they reach, are removed together, and which groups cannot be pruned and why.
    `model` is not changed (shapes are found in eval mode on a capture)."""
    gm = capture(model, concrete_args=concrete_args)
    propagate_shapes(gm, as_args(example_args, "channel analysis"))
    return groups_of(gm)


def refuse_tied(gm: fx.GraphModule, tensors, refuse) -> None:
    """One tensor object under two names among `tensors` ((layer, tensor name) pairs) would be cut
    or grown into two, untying them: call `refuse(name, other)`, which raises."""
    seen: dict[int, str] = {}
    for layer, tensor in tensors:
        t = getattr(gm.get_submodule(layer), tensor, None) if tensor else None
        name = f"{layer}.{tensor}"
        other = seen.setdefault(id(t), name) if t is not None else name
        if other != name:
            refuse(name, other)
