"""grow_channels: widen channel groups, function-preserving at insertion (the inverse of prune_channels)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from dsd_fx.channels.layout import Member
from dsd_fx.channels.groups import ChannelGroup
from dsd_fx.passes.prune_channels import fix_attributes
from dsd_fx.infra.pipeline import note, shapes_of

PASS = "grow_channels"
ONES = ("weight", "running_var")  # a norm's entries that are 1 where it is the identity


@dataclass(frozen=True)
class Growth:
    """`n` new channels for `group`, appended after its last channel at every member.

    sources: empty for how="zeros"; for how="net2net" the channel each new one copies (distinct)."""

    group: ChannelGroup
    n: int
    sources: tuple[int, ...] = ()


Edit = tuple[Member, Growth]


def edits_of(growths: Sequence[Growth]) -> dict[str, dict[str, dict[int, list[Edit]]]]:
    """layer -> tensor -> dim -> the members of grown groups found there (tensor "": a bare count)."""
    out: dict[str, dict[str, dict[int, list[Edit]]]] = {}
    for g in growths:
        for m in g.group.members:
            out.setdefault(m.layer, {}).setdefault(m.tensor, {}).setdefault(m.dim, []).append((m, g))
    return out


def _fresh(t: torch.Tensor, dim: int, count: int, m: Member, gen: torch.Generator) -> torch.Tensor:
    """New entries: a producer's weights uniform in +-1/sqrt(fan_in) (PyTorch's default init of
    Linear and Conv, fan_in = the weights one output sums), biases 0; a norm's identity (weight and
    running_var 1, bias and running_mean 0); a consumer's input columns 0."""
    shape = list(t.shape)
    shape[dim] = count
    if m.role == "norm" and m.tensor in ONES:
        return torch.ones(shape, dtype=t.dtype, device=t.device)
    if m.role == "out" and t.dim() >= 2:
        bound = (t.shape[dim] / t.numel()) ** 0.5
        fresh = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        return fresh.to(dtype=t.dtype, device=t.device)
    return torch.zeros(shape, dtype=t.dtype, device=t.device)


def _index(positions: list[int], t: torch.Tensor) -> torch.Tensor:
    return torch.tensor(positions, dtype=torch.long, device=t.device)


def grown_tensor(t: torch.Tensor, dim: int, edits: Sequence[Edit], gen: torch.Generator) -> torch.Tensor:
    """`t` with every edit's new channels inserted after its member's last block along `dim`.

    net2net: the consumers' columns of each copied channel are halved first, then the copies
    (of producers' rows, norm entries and the halved columns) inserted."""
    t = t.detach().clone()
    for m, g in edits:
        if g.sources and m.role == "in":
            idx = _index(m.positions(g.sources), t)
            t.index_copy_(dim, idx, t.index_select(dim, idx) * 0.5)
    for m, g in sorted(edits, key=lambda e: -(e[0].offset + e[0].length)):  # the last first: earlier indices stay
        pos = (m.offset + m.length) * m.repeat
        block = (t.index_select(dim, _index(m.positions(g.sources), t)) if g.sources
                 else _fresh(t, dim, g.n * m.repeat, m, gen))
        t = torch.cat([t.narrow(dim, 0, pos), block, t.narrow(dim, pos, t.shape[dim] - pos)], dim)
    return t


def grow_layer(module: nn.Module, tensors: Mapping[str, Mapping[int, list[Edit]]], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Replace `module`'s tensors named in `tensors` by wider new ones (parameters stay parameters,
    under the same names, with the same requires_grad) and fix its size attributes. Returns them."""
    new: dict[str, torch.Tensor] = {}
    added = 0
    for name, dims in tensors.items():
        added = max(added, max(sum(g.n * m.repeat for m, g in e) for e in dims.values()))
        if not name:
            continue
        old = module._parameters[name] if name in module._parameters else module._buffers[name]
        w = old
        for dim in sorted(dims):
            w = grown_tensor(w, dim, dims[dim], gen)
        if name in module._parameters:
            module._parameters[name] = new[name] = nn.Parameter(w, requires_grad=old.requires_grad)
        else:
            module._buffers[name] = new[name] = w
    fix_attributes(module, -added)  # a norm's count grows by what its members got
    return new


def grow_channels(gm: fx.GraphModule, growths: Sequence[Growth], seed: int = 0) -> PassResult:
    """Add `growth.n` channels to each grown group at every member: producers' output slices, norm
    affine params and running stats, consumers' input slices (cat offsets and flatten blocks
    included). The graph's code does not change; its layers' shapes do.

    Before (code, identical after)::

        conv1 = self.conv1(x);  x = None
        bn1 = self.bn1(conv1);  conv1 = None
        relu = torch.nn.functional.relu(bn1);  bn1 = None
        conv2 = self.conv2(relu);  relu = None

    After (shapes), conv1 grown by 4 channels with how="zeros"::

        conv1.weight (8, 3, 3, 3) -> (12, 3, 3, 3)  (new rows: the layer's init scale)
        bn1.weight (8,) -> (12,)                     (new entries: the identity)
        conv2.weight (4, 8, 3, 3) -> (4, 12, 3, 3)  (new input columns: zero)

    New tensors replace the layers' entries (the shells of a capture): the user's model keeps its
    own tensors. The text of the change (describe_growing) is the pass's note (dsd_fx.infra.pipeline.note).
    """
    gen = torch.Generator().manual_seed(seed)
    layers = edits_of(growths)

    before = shapes_of(gm, layers)
    for layer, tensors in layers.items():
        grow_layer(gm.get_submodule(layer), tensors, gen)
    note(gm, PASS, describe_growing(before, shapes_of(gm, layers), growths))
    return PassResult(gm, modified=bool(growths))


def describe_growing(before: Mapping[str, tuple], after: Mapping[str, tuple], growths: Sequence[Growth]) -> str:
    """The change as text, since the code does not change: groups that grew, then each tensor's
    shape before -> after."""
    lines = [f"{PASS}: {len(growths)} channel groups grew by {sum(g.n for g in growths)} channels"]
    for g in growths:
        shown = ", ".join(map(str, g.sources[:12])) + (", ..." if len(g.sources) > 12 else "")
        how = f"copies of channels {shown}" if g.sources else "new, function-preserving init"
        lines.append(f"  group '{g.group.name}' ({', '.join(g.group.producers)}): {g.group.size} -> "
                     f"{g.group.size + g.n} channels ({how})")
    lines.append("shapes:")
    width = max((len(k) for k in before), default=0)
    lines += [f"  {k:<{width}}  {before[k]} -> {after[k]}" for k in sorted(before)]
    return "\n".join(lines)
