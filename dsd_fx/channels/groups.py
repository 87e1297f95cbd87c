"""Channel groups: which channels of which layers must be removed together (structural pruning)."""
from __future__ import annotations

import contextlib
import io
import math
import re
import sys
from dataclasses import dataclass, replace
from typing import Any

import networkx as nx
import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from dsd_fx.infra.calls import as_args, eval_mode
from dsd_fx.infra.graph_capture import capture as capture_model
from dsd_fx.channels.flow import Propagation
from dsd_fx.channels.layout import FlowState, Member
from dsd_fx.channels.pieces import refine


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that live or die together: removing group channel c removes, at every member, the
    slice `member.positions([c])` of `member.layer`'s `member.tensor` along `member.dim`.

    A group's channels are units: one channel each, or, where a view splits a width into
    attention heads, one head each (its Q, K and V rows, its output projection's columns), or
    one KV head with the query heads that read it; `width` is how many channels of the first
    producer one unit holds (1 for plain channels, head_dim for heads).

    producers: the layers whose output channels the group is (an Embedding, Linear or Conv).
    blocked_by: why the group may not be pruned (the node that stopped it); empty if prunable.
    """

    index: int
    size: int
    members: tuple[Member, ...]
    producers: tuple[str, ...]
    blocked_by: tuple[str, ...] = ()
    width: int = 1

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
        units = f"{self.size} channels" if self.width == 1 else f"{self.size} units of {self.width} channels"
        return f"group {self.index} '{self.name}' ({units}, {state}): {where}"


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
    for a, b, _ in state.ties:
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


def _coarse(m: Member, per: int) -> Member | None:
    """`m` in group units of `per` of its atom's channels (None where a unit would be cut)."""
    if per % m.unit or m.offset % per or m.start % per or m.length % per:
        return None
    return replace(m, offset=m.offset // per, start=m.start // per, length=m.length // per,
                   repeat=m.repeat * per // m.unit, unit=1)


def _units(atoms: list[int], state: FlowState, ties: list[tuple[int, int, int]], attached) -> int:
    """The most units the group's atoms can be cut into alike: a divisor of every atom's size, of
    every tie's part count and of every member's block count, whole blocks at every member."""
    n = 0
    for a in atoms:
        n = math.gcd(n, state.sizes[a])
    for _, _, parts in ties:
        n = math.gcd(n, parts)
    for a, m in attached:
        n = math.gcd(n, state.sizes[a] // m.unit if state.sizes[a] % m.unit == 0 else 1)
    for u in sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True):
        if all(_coarse(m, state.sizes[a] // u) is not None for a, m in attached):
            return u
    return 1


def _group(k: int, comp, state: FlowState, made: set[int]) -> ChannelGroup:
    atoms = sorted(a for kind, a in comp if kind == "atom")
    inside = set(atoms)
    attached = [(a, m) for a, m in state.members if a in inside]
    ties = [t for t in state.ties if t[0] in inside]
    blocked = [r for a in atoms for r in state.blocked.get(a, [])]
    n = _units(atoms, state, ties, attached)
    members: dict[Member, set[int]] = {}
    for a, m in attached:  # a member several atoms reach must be the same slices in group units
        members.setdefault(m, set()).add(state.sizes[a] // n)
    coarse = {_coarse(m, per) or m for m, pers in members.items() for per in pers}
    if any(len(pers) > 1 for pers in members.values()):
        blocked.append("a layer reads channel spaces of different sizes at the same indices")
    if any(m.unit != 1 for m in coarse):
        blocked.append("its channels cannot be cut into equal units (heads) at every layer they reach")
    ordered = sorted(coarse, key=lambda m: (m.role != "out", m.layer, m.tensor, m.offset))
    producers = tuple(dict.fromkeys(state.producers[a] for a in atoms if a in made))
    first = next((a for a in atoms if a in made), atoms[0])
    return ChannelGroup(k, n, tuple(ordered), producers, tuple(dict.fromkeys(blocked)), state.sizes[first] // n)


def groups_of(gm: fx.GraphModule, hidden: bool = False) -> list[ChannelGroup]:
    """The channel groups of a shape-propagated capture, in graph order of their first producer.
    hidden=True lets channels through LayerNorm and RMSNorm (the residual stream of a
    transformer): their statistics then run over fewer channels."""
    state = refine(Propagation(gm, hidden).run())
    made = {a for a, m in state.members if m.role == "out"}  # atoms a layer makes (not a cat's untracked part)
    comps = sorted(nx.connected_components(_graph(state)), key=lambda c: min(a for kind, a in c if kind == "atom"))
    out = [_group(k, comp, state, made) for k, comp in enumerate(comps)]
    clash = _overlaps(out)
    return [replace(grp, blocked_by=grp.blocked_by + (clash[grp.index],)) if grp.index in clash else grp for grp in out]


def channel_groups(model: torch.nn.Module, example_args: Any, *, concrete_args: dict | None = None,
                   hidden: bool = False, capture: str = "auto") -> list[ChannelGroup]:
    """Capture `model` (any GraphModule accepted; capture= as for transform: "auto" traces with
    torch.fx, then torch.export), propagate shapes through `example_args` and return its channel
    groups: which output channels of which layers, with the norms and consumers they reach, are
    removed together, and which groups cannot be pruned and why. `model` is not changed (shapes
    are found in eval mode on a capture). hidden=True: see groups_of."""
    args = as_args(example_args, "channel analysis")
    gm = capture_model(model, concrete_args=concrete_args, how=capture, example_args=args)
    propagate_shapes(gm, args)
    return groups_of(gm, hidden)


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
