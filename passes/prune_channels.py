"""prune_channels: physically remove chosen channels, making every layer of their groups smaller."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from dsd_fx.channels.groups import ChannelGroup
from dsd_fx.infra.pipeline import note, shapes_of
from dsd_fx.op_table import module_row

PASS = "prune_channels"


def cut_positions(groups: Sequence[ChannelGroup], removed: Mapping[int, Sequence[int]]) -> dict[tuple[str, str, int], list[int]]:
    """(layer, tensor, dim) -> the indices to delete there, from the channels removed per group."""
    cuts: dict[tuple[str, str, int], set[int]] = {}
    for g in groups:
        channels = removed.get(g.index, ())
        if not channels:
            continue
        for m in g.members:
            cuts.setdefault((m.layer, m.tensor, m.dim), set()).update(m.positions(channels))
    return {k: sorted(v) for k, v in cuts.items() if v}


def _smaller(t: torch.Tensor, cuts: dict[int, list[int]]) -> torch.Tensor:
    t = t.detach()
    for dim, gone in cuts.items():
        drop = set(gone)
        keep = torch.tensor([i for i in range(t.shape[dim]) if i not in drop], dtype=torch.long, device=t.device)
        t = t.index_select(dim, keep)
    return t.clone()


def fix_attributes(module: nn.Module, removed_count: int) -> None:
    """Make a layer's size attributes say what its new tensors hold (its op-table row's `resize`)."""
    row = module_row(module)
    if row is not None and row.resize is not None:
        row.resize(module, removed_count)


def adopt(theirs: nn.Module, mine: nn.Module, names) -> None:
    """The user's layer `theirs` takes the rewritten shell's tensors (`names`, the same objects:
    parameters stay parameters) and its size attributes: the write-back of inplace=True."""
    for name in names:
        if name in mine._parameters:
            theirs._parameters[name] = mine._parameters[name]
        elif name:
            theirs._buffers[name] = mine._buffers[name]
    row = module_row(mine)
    for attr in row.sizes if row is not None else ():
        if attr in mine.__dict__:
            theirs.__dict__[attr] = mine.__dict__[attr]


def shrink_layer(module: nn.Module, cuts: Mapping[str, Mapping[int, list[int]]]) -> dict[str, torch.Tensor]:
    """Replace `module`'s tensors named in `cuts` by smaller new ones (parameters stay parameters,
    under the same names, with the same requires_grad) and fix its size attributes. Returns them."""
    new: dict[str, torch.Tensor] = {}
    counts = [len(gone) for name, dims in cuts.items() for gone in dims.values()]
    for name, dims in cuts.items():
        if not name:
            continue
        if name in module._parameters:
            old = module._parameters[name]
            module._parameters[name] = new[name] = nn.Parameter(_smaller(old, dims), requires_grad=old.requires_grad)
        else:
            module._buffers[name] = new[name] = _smaller(module._buffers[name], dims)
    fix_attributes(module, max(counts, default=0))
    return new


def layer_cuts(cuts: Mapping[tuple[str, str, int], list[int]]) -> dict[str, dict[str, dict[int, list[int]]]]:
    by_layer: dict[str, dict[str, dict[int, list[int]]]] = {}
    for (layer, tensor, dim), gone in cuts.items():
        by_layer.setdefault(layer, {}).setdefault(tensor, {})[dim] = gone
    return by_layer


def prune_channels(gm: fx.GraphModule, groups: Sequence[ChannelGroup], removed: Mapping[int, Sequence[int]]) -> PassResult:
    """Remove group channels `removed[g.index]` from every member of each group: producers' output
    slices, norm affine params and running stats, consumers' input slices (offsets and flatten
    blocks included). The graph's code does not change; its layers' shapes do.

    Before (code, identical after)::

        conv1 = self.conv1(x);  x = None
        bn1 = self.bn1(conv1);  conv1 = None
        relu = torch.nn.functional.relu(bn1);  bn1 = None
        flatten = torch.flatten(relu, 1);  relu = None
        fc = self.fc(flatten);  flatten = None
        return fc

    After (shapes), with 2 of conv1's 8 channels removed::

        conv1.weight (8, 3, 3, 3) -> (6, 3, 3, 3)     bn1.weight (8,) -> (6,)
        fc.weight (10, 128) -> (10, 96)               (each channel a block of 16 features)

    New tensors replace the layers' entries (the shells of a capture): the user's model keeps its
    own tensors. The text of the change (describe_pruning) is the pass's note (dsd_fx.infra.pipeline.note).
    """
    cuts = cut_positions(groups, removed)
    by_layer = layer_cuts(cuts)
    before = shapes_of(gm, by_layer)
    for layer, tensors in by_layer.items():
        shrink_layer(gm.get_submodule(layer), tensors)
    after = shapes_of(gm, by_layer)
    note(gm, PASS, describe_pruning(before, after, groups, removed))
    return PassResult(gm, modified=bool(cuts))


def describe_pruning(before: Mapping[str, tuple], after: Mapping[str, tuple], groups: Sequence[ChannelGroup],
                     removed: Mapping[int, Sequence[int]]) -> str:
    """The change as text, since the code does not change: groups that lost channels, then each
    tensor's shape before -> after."""
    lost = [g for g in groups if removed.get(g.index)]
    total = sum(len(removed[g.index]) for g in lost)
    lines = [f"{PASS}: {len(lost)} of {len(groups)} channel groups lost {total} channels"]
    for g in lost:
        gone = sorted(removed[g.index])
        shown = ", ".join(map(str, gone[:12])) + (", ..." if len(gone) > 12 else "")
        lines.append(f"  group '{g.name}' ({', '.join(g.producers)}): {g.size} -> {g.size - len(gone)} channels (removed {shown})")
    lines.append("shapes:")
    width = max((len(k) for k in before), default=0)
    lines += [f"  {k:<{width}}  {before[k]} -> {after[k]}" for k in sorted(before)]
    return "\n".join(lines)
