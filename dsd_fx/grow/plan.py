"""The grow phase's plan: find the named layers' channel groups, size and seed their growth, check, commit."""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch
from torch import fx, nn

from dsd_fx.channels.groups import ChannelGroup, groups_of, propagate_shapes, refuse_tied
from dsd_fx.infra.calls import eval_mode, has_non_finite
from dsd_fx.grow.config import GrowConfig
from dsd_fx.passes.grow_channels import PASS as GROW_CHANNELS, Growth, edits_of, grow_channels
from dsd_fx.passes.grow_inception import PASS as GROW_INCEPTION, InceptionGrowth, grow_inception, split_width, without_outputs
from dsd_fx.passes.prune_channels import adopt
from dsd_fx.infra.pipeline import Invariant, Plan
from dsd_fx.op_table import module_row
from dsd_fx.prune.plan import score
from dsd_fx.infra.rewrite import owner_of
from dsd_fx.tags import has_dsd_nodes



def _group_of(groups: Sequence[ChannelGroup], layer: str) -> ChannelGroup:
    found = [g for g in groups if layer in g.producers]
    if not found:
        layers = sorted({p for g in groups for p in g.producers})
        raise ValueError(f"grow: layer {layer!r} in at= makes no channel group (layers that make channels: "
                         f"{', '.join(layers)}); name one of them")
    if len(found) > 1 or found[0].blocked_by:
        why = "; ".join(r for g in found for r in g.blocked_by) or f"it makes {len(found)} channel groups (called twice)"
        raise ValueError(f"grow: the channel group of {layer!r} cannot grow: {why}; leave {layer!r} out of at=")
    g = found[0]
    if g.width > 1:
        raise ValueError(f"grow: the channel group of {layer!r} is attention heads ({g.size} units of {g.width} channels): "
                         f"dsd_fx does not grow heads; leave {layer!r} out of at=")
    literal = next((m for m in g.members if m.role == "size"), None)
    if literal is not None:
        raise ValueError(f"grow: the channel group of {layer!r} has its size written as a number in node '{literal.layer}' "
                         f"(argument {literal.tensor[1:]}), which grow does not rewrite; leave {layer!r} out of at=")
    return g


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
        g = _group_of(groups, layer)
        _split(g, layer)
        n = _count(g, layer, config)
        sources: tuple[int, ...] = ()
        if config.how == "net2net":
            scores = score(gm, g, "l1", config.example_args)
            sources = tuple(torch.argsort(-scores, stable=True)[:n].tolist())
        out.setdefault(g.index, Growth(g, n, sources))
    return list(out.values())


def _keeps_grid(module: nn.Module) -> bool:
    """Whether `module` maps every input size h to (h - 1) // stride + 1 per spatial dim, the grid of
    the branches' first 1x1 convolution with its stride: padding 'same', or 2 * padding =
    dilation * (kernel - 1) in every dim."""
    if module.padding == "same":
        return True
    pads = (0,) * len(module.kernel_size) if module.padding == "valid" else module.padding
    return all(2 * p == d * (k - 1) for p, d, k in zip(pads, module.dilation, module.kernel_size))


def _conv_node(gm: fx.GraphModule, layer: str) -> fx.Node:
    """The one call of `layer`, a convolution whose output keeps the grid a 1x1 convolution with its
    stride makes (the branches' grid), for every input size: refused otherwise, with what to do."""
    try:
        module = gm.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"grow: how='inception' grows a convolution module (nn.Conv1d/2d/3d), but {layer!r} is not a "
                         "submodule (a functional convolution's weight?): make it an nn.ConvNd, or grow it with "
                         "how='zeros' or how='net2net'") from None
    row = module_row(module)
    if row is None or row.family != "conv" or module.groups != 1:
        kind = type(module).__name__ + (f" with groups={module.groups}" if getattr(module, "groups", 1) != 1 else "")
        raise ValueError(f"grow: how='inception' grows a convolution (Conv1d/2d/3d, groups=1) into an Inception module; "
                         f"{layer!r} is a {kind}: grow it with how='zeros' or how='net2net' instead")
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == layer]
    if len(calls) != 1:
        raise ValueError(f"grow: how='inception' needs {layer!r} called once, it is called {len(calls)} times: "
                         "grow a layer that is called once")
    node = calls[0]
    if not _keeps_grid(module):
        x = node.args[0] if node.args else node.kwargs.get("input")
        spatial = module.weight.dim() - 2
        have, out = tuple(x.meta["tensor_meta"].shape[-spatial:]), tuple(node.meta["tensor_meta"].shape[-spatial:])
        want = tuple((h - 1) // s + 1 for h, s in zip(have, module.stride))
        raise ValueError(f"grow: how='inception' adds 1x1/3x3 branches with {layer!r}'s stride {module.stride} and 'same' "
                         f"padding, which map an input grid h to (h - 1) // stride + 1 (example_args: {have} to {want}), "
                         f"but {layer!r} (kernel {module.kernel_size}, padding {module.padding}, dilation "
                         f"{module.dilation}) does not for every h (example_args: {have} to {out}): grow a layer with "
                         "2 * padding = dilation * (kernel - 1), or use how='zeros'")
    return node


def inception_growths(gm: fx.GraphModule, growths: Sequence[Growth], config: GrowConfig) -> list[InceptionGrowth]:
    """One InceptionGrowth per layer in at=; the width split over the four branches."""
    out, taken = [], {}
    for layer, growth in zip(config.at, growths):
        _conv_node(gm, layer)
        other = taken.setdefault(growth.group.index, layer)
        if other != layer:
            raise ValueError(f"grow: {other!r} and {layer!r} make one channel group (tied, e.g. by an add): "
                             f"how='inception' grows one layer of a group; leave one of them out of at=")
        if growth.n < 4:
            raise ValueError(f"grow: how='inception' adds 4 branches (1x1 | 1x1->3x3 | 1x1->3x3->3x3 | pool->1x1), "
                             f"at least one channel each, but width={config.width!r} gives {growth.n} channel(s) for "
                             f"{layer!r}: ask a width of at least 4 channels (width=4, or a larger fraction)")
        name, k = f"{layer}_inception", 1
        while _exists(gm, name):
            k += 1
            name = f"{layer}_inception_{k}"
        out.append(InceptionGrowth(layer, without_outputs(growth, layer), split_width(growth.n), name))
    return out


def _exists(gm: fx.GraphModule, name: str) -> bool:
    """Whether `name` is taken: a submodule, parameter, buffer or any attribute of its parent."""
    owner, leaf = owner_of(gm, name)
    return hasattr(owner, leaf)


def _refuse_tied(gm: fx.GraphModule, growths: Sequence[Growth]) -> None:
    def refuse(name: str, other: str) -> None:
        raise ValueError(f"grow: '{name}' is the same tensor as '{other}' (tied weights); growing "
                         "would untie them: leave these layers' groups out of at=")

    refuse_tied(gm, ((layer, tensor) for layer, tensors in edits_of(growths).items() for tensor in tensors), refuse)


def _refuse_non_finite(gm: fx.GraphModule, growths: Sequence[Growth]) -> None:
    """The tensors growing edits are finite (as the sparse and prune phases check theirs): a NaN
    weight is the user's to fix, refused here, not an invariant failure after the rewrite."""
    for layer, tensors in edits_of(growths).items():
        for tensor in tensors:
            t = getattr(gm.get_submodule(layer), tensor, None) if tensor else None
            if has_non_finite(t):
                raise ValueError(f"grow: '{layer}.{tensor}' holds NaN or Inf; growing it would carry them into the "
                                 "grown layer. Fix the weights, or leave its channel group out of at=")


def _outputs(gm: fx.GraphModule, example_args: tuple) -> list[torch.Tensor]:
    gm.recompile()
    with eval_mode(gm, no_grad=True):
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
    groups = groups_of(gm)
    if config.how == "inception":  # one growth per layer (growths_of merges a group named twice)
        grown = inception_growths(gm, [growths_of(gm, groups, dataclasses.replace(config, at=(a,)))[0] for a in config.at], config)
        growths = [g.growth for g in grown]
    else:
        growths = growths_of(gm, groups, config)
    _refuse_tied(gm, growths)
    _refuse_non_finite(gm, growths)
    want = _outputs(gm, config.example_args)
    if not all(bool(torch.isfinite(t).all()) for t in want if t.is_floating_point()):
        bad = [n for n, p in gm.named_parameters() if has_non_finite(p)]
        raise ValueError("grow: the model's outputs on example_args hold NaN or Inf before growing"
                         + (f" (weight(s) {', '.join(map(repr, bad[:3]))} hold NaN or Inf)" if bad else "")
                         + "; growth is checked function-preserving on these outputs: fix the weights or example_args")
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: its module, as capture took

    def commit() -> None:
        if not config.inplace:
            return
        for layer, tensors in edits_of(growths).items():
            adopt(model.get_submodule(layer), gm.get_submodule(layer), tensors)

    if config.how == "inception":
        recipe = [(GROW_INCEPTION, functools.partial(grow_inception, grown=grown, seed=config.seed))]
    else:
        recipe = [(GROW_CHANNELS, functools.partial(grow_channels, growths=growths, seed=config.seed))]
    return Plan(recipe, [_preserving(config.example_args, want)], commit, [])
