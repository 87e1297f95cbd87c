"""The grow phase's plan: find the named layers' channel groups, size and seed their growth, check, commit."""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import fx

from dsd_fx.channels import ChannelGroup, eval_mode, groups_of, propagate_shapes
from dsd_fx.grow_config import GrowConfig
from dsd_fx.passes.grow_channels import PASS, Growth, edits_of, grow_channels
from dsd_fx.passes.prune_channels import fix_attributes
from dsd_fx.pipeline import Invariant, Plan
from dsd_fx.prune_plan import score
from dsd_fx.tags import has_dsd_nodes

INCEPTION_REFUSED = ("grow: how='inception' is refused for {layer!r}: not built yet. The Inception branches would be new "
                     "graph nodes, and a tagged dsd_fx node makes tags.has_dsd_nodes call the graph sparse-phase, so "
                     "prune, dense and export would then misread the grown graph; grow {layer!r} with how='zeros' "
                     "or how='net2net' (function-preserving widening) instead")


def _group_of(groups: Sequence[ChannelGroup], layer: str) -> ChannelGroup:
    found = [g for g in groups if layer in g.producers]
    if not found:
        layers = sorted({p for g in groups for p in g.producers})
        raise ValueError(f"grow: layer {layer!r} in at= makes no channel group (layers that make channels: "
                         f"{', '.join(layers)}); name one of them")
    if len(found) > 1 or found[0].blocked_by:
        why = "; ".join(r for g in found for r in g.blocked_by) or f"it makes {len(found)} channel groups (called twice)"
        raise ValueError(f"grow: the channel group of {layer!r} cannot grow: {why}; leave {layer!r} out of at=")
    return found[0]


def _split(g: ChannelGroup, layer: str) -> None:
    """Growth appends after the group's last channel: every member must hold the whole group."""
    part = next((m for m in g.members if m.start != 0 or m.length != g.size), None)
    if part is not None:
        raise ValueError(f"grow: the channel group of {layer!r} reaches {part.path} only in part (channels "
                         f"{part.start}..{part.start + part.length - 1} of {g.size}, a split or chunk): growing it would "
                         f"change the split's sizes; leave {layer!r} out of at=")


def _count(g: ChannelGroup, layer: str, config: GrowConfig) -> int:
    n = config.width if isinstance(config.width, int) else math.ceil(config.width * g.size)
    if config.how == "net2net" and n > g.size:
        raise ValueError(f"grow: how='net2net' copies distinct channels, but width={config.width!r} asks {n} of the "
                         f"{g.size} channels of {layer!r}; ask at most {g.size} (or use how='zeros')")
    return n


def growths_of(gm: fx.GraphModule, groups: Sequence[ChannelGroup], config: GrowConfig) -> list[Growth]:
    """One Growth per named layer's group (a group named twice grows once). net2net copies the
    `n` channels of largest L1 over every member's slice (ties: lowest index)."""
    out: dict[int, Growth] = {}
    for layer in config.at:
        if config.how == "inception":
            raise ValueError(INCEPTION_REFUSED.format(layer=layer))
        g = _group_of(groups, layer)
        _split(g, layer)
        n = _count(g, layer, config)
        sources: tuple[int, ...] = ()
        if config.how == "net2net":
            scores = score(gm, g, "l1", config.example_args)
            sources = tuple(torch.argsort(-scores, stable=True)[:n].tolist())
        out.setdefault(g.index, Growth(g, n, sources))
    return list(out.values())


def _refuse_tied(gm: fx.GraphModule, growths: Sequence[Growth]) -> None:
    """One tensor object under two names (tied weights) would be grown into two: refuse."""
    seen: dict[int, str] = {}
    for layer, tensors in edits_of(growths).items():
        for tensor in tensors:
            t = getattr(gm.get_submodule(layer), tensor) if tensor else None
            other = seen.setdefault(id(t), f"{layer}.{tensor}") if t is not None else None
            if other is not None and other != f"{layer}.{tensor}":
                raise ValueError(f"grow: '{layer}.{tensor}' is the same tensor as '{other}' (tied weights); growing "
                                 "would untie them: leave these layers' groups out of at=")


def _outputs(gm: fx.GraphModule, example_args: tuple) -> list[torch.Tensor]:
    gm.recompile()
    with eval_mode(gm):
        out = gm(*example_args)
    return [t for t in torch.utils._pytree.tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _preserving(example_args: tuple, want: list[torch.Tensor]) -> Invariant:
    def check(gm: fx.GraphModule) -> None:
        try:
            got = _outputs(gm, example_args)
        except RuntimeError as err:
            raise AssertionError(f"the grown graph does not run: {err}") from err
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    return Invariant("outputs unchanged by growing (eval mode, example_args)", check)


def grow_plan(gm: fx.GraphModule, config: GrowConfig, model: torch.nn.Module) -> Plan:
    """The Plan of transform(phase="grow"): every check runs here or in the invariants, before
    the commit (which writes the wider layers into `model` only with inplace=True)."""
    if has_dsd_nodes(gm.graph):
        raise ValueError(f"transform(phase='grow'): {type(gm).__name__} is a sparse-phase graph (it has dsd_fx mask "
                         "nodes); re-dense it first with transform(gm, phase='dense'), then grow channels")
    propagate_shapes(gm, config.example_args)
    growths = growths_of(gm, groups_of(gm), config)
    _refuse_tied(gm, growths)
    want = _outputs(gm, config.example_args)
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: its module, as capture took

    def commit() -> None:
        if not config.inplace:
            return
        for layer, tensors in edits_of(growths).items():
            mine, theirs = gm.get_submodule(layer), model.get_submodule(layer)
            for name in tensors:
                if name in mine._parameters:
                    theirs._parameters[name] = mine._parameters[name]
                elif name:
                    theirs._buffers[name] = mine._buffers[name]
            added = max(sum(g.n * m.repeat for m, g in e) for dims in tensors.values() for e in dims.values())
            fix_attributes(theirs, -added)

    recipe = [(PASS, functools.partial(grow_channels, growths=growths, seed=config.seed))]
    return Plan(recipe, [_preserving(config.example_args, want)], commit, [])
