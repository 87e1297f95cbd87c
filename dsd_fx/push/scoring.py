"""Discriminant importance of every channel group: CVIU21's deconvolution trace-back, by weight magnitudes.

Source (../shared/PAPERS.md's summary of CVIU21 §3: Tian, Arbel, Clark, "Task dependent deep LDA
pruning of neural networks", arXiv 1803.08134): the utility of a pre-decision unit is
sigma_b^2 / sigma_w^2 (dsd_fx.push.objective.tap_utility), and earlier layers get theirs by back-projecting
the top layer's utilities through the network's filters ("deconvolution"; a Linear is a 1x1 conv).

Inferred here: Zeiler-Fergus's back-projection max-unpools with the switches saved on single
images, rectifies and applies the transposed filters, then takes the maximum over positions. This
module replaces it by a data-free magnitude back-projection: the importance of input channel c of
a consumer layer is sum_o importance(o) * sum_k |W[o, c, k]| over kernel positions k; a flatten
block (one channel, H*W features) sums its block; a group with several consumers (concat offsets,
residual adds, a tensor read twice) sums their contributions; a group with normalisation layers is
scaled by their gain |gamma| / sqrt(running_var + eps) (averaged when a group has several); each
group's scores are divided by their max before they go further back, so scales do not explode.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import networkx as nx
import torch
from torch import fx

from dsd_fx.infra.graph_capture import capture
from dsd_fx.channels.flow import Propagation
from dsd_fx.channels.layout import Layout, Member
from dsd_fx.channels.groups import ChannelGroup, groups_of, propagate_shapes
from dsd_fx.infra.calls import as_args

METHODS = ("discriminant",)


def _checked(data: Iterable) -> Iterable:
    """`data`'s batches, each checked to be (inputs, integer labels) before it is used."""
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            what = f"a {type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            raise ValueError(f"importance='discriminant': batch {i} of data is {what}; data must yield (inputs, labels) "
                             "pairs, like a DataLoader of TensorDataset(x, y)")
        labels = batch[1]
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            got = f"{labels.dtype} tensor" if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"importance='discriminant': batch {i}'s labels are a {got}; give integer class ids "
                             "(one per sample), not one-hot vectors or logits")
        yield batch


def _positions(m: Member) -> torch.Tensor:
    """The indices of m's dim that group channels m.start .. m.start + m.length own, channel-major."""
    base = (m.offset + torch.arange(m.length))[:, None] * m.repeat
    return (base + torch.arange(m.repeat)[None, :]).flatten()


def _seed(lay: Any, name: str, utility: torch.Tensor, atom_group: dict[int, int],
          groups: Sequence[ChannelGroup]) -> dict[int, torch.Tensor]:
    """The tap's unit utilities as scores of the groups whose channels the tapped tensor holds."""
    if not isinstance(lay, Layout) or lay.dim != 1 or lay.size * lay.repeat != utility.numel():
        raise ValueError(f"importance='discriminant': tap {name!r} ({utility.numel()} units) does not hold the channels "
                         "of a prunable layer at dim 1; tap a layer's output (or the input of a Linear) instead")
    out: dict[int, torch.Tensor] = {}
    pos = 0
    for s in lay.segments:
        g = atom_group[s.atom]
        block = utility[pos * lay.repeat:(pos + s.length) * lay.repeat].reshape(s.length, lay.repeat).sum(1)
        out.setdefault(g, torch.zeros(groups[g].size))[s.start:s.start + s.length] += block.float()
        pos += s.length
    return out


def _norm_gain(gm: fx.GraphModule, g: ChannelGroup) -> torch.Tensor:
    """Per group channel: the mean over its normalisation layers of |gamma| / sqrt(running_var + eps) (1 if none)."""
    total, count = torch.zeros(g.size), torch.zeros(g.size)
    for m in {m.layer: m for m in g.members if m.role == "norm"}.values():
        layer = gm.get_submodule(m.layer)
        gamma, var = getattr(layer, "weight", None), getattr(layer, "running_var", None)
        if not isinstance(gamma, torch.Tensor) and not isinstance(var, torch.Tensor):
            continue
        gain = gamma.detach().float().abs() if isinstance(gamma, torch.Tensor) else torch.ones(var.shape[0])
        if isinstance(var, torch.Tensor):
            gain = gain / (var.detach().float() + getattr(layer, "eps", 0.0)).sqrt()
        total[m.start:m.start + m.length] += gain[m.offset:m.offset + m.length]
        count[m.start:m.start + m.length] += 1
    return torch.where(count > 0, total / count.clamp(min=1), torch.ones(g.size))


def _producers(groups: Sequence[ChannelGroup]) -> dict[tuple[str, str], tuple[int, Member]]:
    """(layer, tensor) -> (group, out member) of every tensor whose output dim makes a group's channels."""
    return {(m.layer, m.tensor): (g.index, m) for g in groups for m in g.members if m.role == "out" and m.tensor}


def _back_projection(gm: fx.GraphModule, m: Member, out: Member, out_scores: torch.Tensor, size: int) -> torch.Tensor:
    """Per group channel: sum_o score(o) * sum_k |W[o, c, k]| through consumer slot m of W (out: W's output member)."""
    w = getattr(gm.get_submodule(m.layer), m.tensor).detach().float().abs()
    per_out = torch.zeros(w.shape[out.dim])
    per_out[_positions(out)] = out_scores[out.start:out.start + out.length].repeat_interleave(out.repeat)
    mat = w.movedim((out.dim, m.dim), (0, 1)).reshape(w.shape[out.dim], w.shape[m.dim], -1).sum(-1)
    per_in = per_out @ mat
    scores = torch.zeros(size)
    scores[m.start:m.start + m.length] = per_in[_positions(m)].reshape(m.length, m.repeat).sum(1)
    return scores


def _reach(gm: fx.GraphModule) -> tuple[nx.DiGraph, dict[str, list[fx.Node]]]:
    """The graph's data flow, and the nodes that apply each layer's weights (a module call, or the users of a get_attr)."""
    flow, nodes_of = nx.DiGraph(), {}
    for n in gm.graph.nodes:
        flow.add_edges_from((a, n) for a in n.all_input_nodes)
        if n.op == "call_module":
            nodes_of.setdefault(n.target, []).append(n)
        elif n.op == "get_attr":
            nodes_of.setdefault(n.target.rpartition(".")[0], []).extend(n.users)
    return flow, nodes_of


def _traced(gm, g: ChannelGroup, producers, scored: dict[str, torch.Tensor], reached=None) -> torch.Tensor | None:
    """The sum of the back-projections from g's consumers whose output is scored (and, if given, in `reached`)."""
    total, any_ = torch.zeros(g.size), False
    for m in g.members:
        h = producers.get((m.layer, m.tensor)) if m.role == "in" else None
        if h is not None and m.layer in scored and (reached is None or m.layer in reached):
            total += _back_projection(gm, m, h[1], scored[m.layer], g.size)
            any_ = True
    return total if any_ else None


def _combine(gm, g: ChannelGroup, traced: torch.Tensor | None, seeds: list[torch.Tensor]) -> torch.Tensor | None:
    if traced is None and not seeds:
        return None
    total = _normalised(traced * _norm_gain(gm, g)) if traced is not None else torch.zeros(g.size)
    return _normalised(total + sum((_normalised(s) for s in seeds), torch.zeros(g.size)))


def trace_back(gm: fx.GraphModule, groups: Sequence[ChannelGroup],
               seeds: list[tuple[fx.Node, int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Group index -> scores (max 1). Producing layers in reverse graph order: a layer's output gets the
    back-projection from the consumers downstream of it (a residual stream's early producer counts
    the block it feeds, the late one does not), scaled by its group's norm gain, plus the seeds of the
    taps downstream; a group's scores sum all its consumers and seeds."""
    producers = _producers(groups)
    flow, nodes_of = _reach(gm)
    layers = {m.layer: gi for (m_layer, _), (gi, m) in producers.items() if m_layer in nodes_of}
    position = {n: k for k, n in enumerate(gm.graph.nodes)}
    scored: dict[str, torch.Tensor] = {}
    for layer in sorted(layers, key=lambda name: -max(position[n] for n in nodes_of[name])):
        below = set(nodes_of[layer]).union(*(nx.descendants(flow, n) for n in nodes_of[layer]))
        reached = {name for name, ns in nodes_of.items() if below.intersection(ns)}
        g = groups[layers[layer]]
        mine = [s for node, gi, s in seeds if gi == g.index and node in below]
        score = _combine(gm, g, _traced(gm, g, producers, scored, reached), mine)
        if score is not None:
            scored[layer] = score
    out = {}
    for g in groups:
        score = _combine(gm, g, _traced(gm, g, producers, scored), [s for _, gi, s in seeds if gi == g.index])
        if score is not None:
            out[g.index] = score
    return out


def _normalised(s: torch.Tensor) -> torch.Tensor:
    top = s.max() if s.numel() else s.new_zeros(())
    return s / top if top > 0 else s.clone()


def discriminant_scores(gm: fx.GraphModule, groups: Sequence[ChannelGroup], data: Iterable,
                        taps: Sequence[str] | None = None) -> dict[int, torch.Tensor]:
    """Group index -> discriminant importance, for a shape-propagated capture `gm` and its `groups`:
    the tap utility (sigma_b^2 / sigma_w^2) over `data`, traced back group by group (trace_back)."""
    from dsd_fx.passes.insert_taps import plan_taps
    from dsd_fx.push.objective import tap_push, tap_utility

    try:
        planned = plan_taps(gm, None if taps is None else list(taps))
    except ValueError as err:
        raise ValueError(f"importance='discriminant' scores units by their class separation at a tapped layer: {err}. "
                         "Or score with dsd_fx.importance(model, data, taps=[...]) and pass importance=lambda g, _: "
                         "scores[g.name]") from err
    prop = Propagation(gm)
    state = prop.run()
    where = {m: g.index for g in groups for m in g.members}
    atom_group = {a: where[m] for a, m in state.members if m in where}
    utility = tap_utility(tap_push(gm, taps), _checked(data))
    seeds = [(node, i, s) for name, node in planned
             for i, s in _seed(prop.layouts.get(node), name, utility[name], atom_group, groups).items()]
    return trace_back(gm, groups, seeds)


def importance(model: torch.nn.Module, data: Iterable, method: str = "discriminant", *,
               example_args: Any = None, taps: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """{channel group name: Tensor(group size)}: each channel's discriminant importance, max 1 per group.

    `data` yields (inputs, labels) batches (a DataLoader will do). The tapped layer's units (default:
    the input of the final classifier; `taps` as for phase="push") get CVIU21 §3's utility
    sigma_b^2 / sigma_w^2 over `data`; every earlier group gets the magnitude back-projection of its
    consumers' scores (see the module's docstring: what is from CVIU21 and what is inferred). Groups
    that feed no scored group are left out. `example_args` (default: the first batch's inputs)
    propagates shapes. `model` is not changed (eval mode, no gradients, on a capture).
    """
    if method not in METHODS:
        raise ValueError(f"importance: unknown method {method!r}; use 'discriminant' (CVIU21's class-separation utility, traced back)")
    if example_args is None:
        if iter(data) is data:
            raise TypeError("importance: data is an iterator, which the first batch (taken for example_args) would use "
                            "up; pass a list of batches or a DataLoader, or give example_args=(x,)")
        first = next(iter(_checked(data)), None)
        if first is None:
            raise ValueError("importance: data yielded no batch; give (inputs, labels) batches")
        example_args = first[0]
    args = tuple(example_args) if isinstance(example_args, list) else as_args(example_args, "channel analysis")
    gm = capture(model)
    propagate_shapes(gm, args)
    groups = groups_of(gm)
    return {groups[i].name: s for i, s in sorted(discriminant_scores(gm, groups, data, taps).items())}
