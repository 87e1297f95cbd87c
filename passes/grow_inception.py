"""grow_inception: grow a convolution into an Inception module, function-preserving at insertion."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from dsd_fx.passes.grow_channels import PASS as GROW_CHANNELS, Growth, describe_growing, edits_of, grow_layer
from dsd_fx.infra.pipeline import note, shapes_of
from dsd_fx.op_table import layer_class
from dsd_fx.tags import Role, tag

PASS = "grow_inception"
# the basic Inception module's branches beside the grown layer (GPP's growing, after GoogLeNet):
# 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 | 3-max-pool -> 1x1 (names as torchvision's Inception3)
BRANCHES = ("branch1x1", "branch3x3", "branch3x3dbl", "branch_pool")


@dataclass(frozen=True)
class InceptionGrowth:
    """`layer` (a Conv1d/2d/3d called once) becomes one branch of an Inception module: the new
    branches read its input, and cat([layer(x), branches...]) replaces its output everywhere.

    growth: the layer's channel group widened by the branches' channels at every member but the
        layer's own outputs (norms: identity entries; other producers: new rows; consumers: zero
        input columns, which is what keeps the function).
    widths: output channels of each branch (BRANCHES order); name: the new modules' container."""

    layer: str
    growth: Growth
    widths: tuple[int, ...]
    name: str


def split_width(n: int) -> tuple[int, ...]:
    """`n` channels over the four branches, as evenly as can be (the first ones get the rest)."""
    return tuple(n // len(BRANCHES) + (1 if k < n % len(BRANCHES) else 0) for k in range(len(BRANCHES)))


def _conv(conv: nn.Module, cin: int, cout: int, kernel: int, stride, bias: bool, gen: torch.Generator) -> nn.Module:
    """A plain nn.Conv1d/2d/3d (as `conv`'s dims) on `conv`'s dtype and device: weights uniform in +-1/sqrt(fan_in)
    (PyTorch's default scale), biases 0, padding that keeps the grid (kernel // 2)."""
    w = conv.weight
    cls = layer_class("conv", w.dim() - 2)
    new = cls(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias, device="meta")
    fan_in = cin * kernel ** (w.dim() - 2)
    weight = (torch.rand(new.weight.shape, generator=gen) * 2 - 1) / fan_in ** 0.5
    new.weight = nn.Parameter(weight.to(dtype=w.dtype, device=w.device))
    if bias:
        new.bias = nn.Parameter(torch.zeros(cout, dtype=w.dtype, device=w.device))
    return new


def branches(conv: nn.Module, widths: Sequence[int], gen: torch.Generator) -> nn.ModuleDict:
    """The new branches for `conv`: each starts with `conv`'s stride (so that its grid is the grid
    of `conv`'s output where `conv` pads to keep it), ReLU between its convolutions; the last
    convolution of each has a bias where `conv` has one."""
    cin, stride, bias = conv.in_channels, conv.stride, conv.bias is not None
    pool = layer_class("max_pool", conv.weight.dim() - 2)
    w1, w3, wd, wp = widths
    return nn.ModuleDict({
        "branch1x1": nn.Sequential(_conv(conv, cin, w1, 1, stride, bias, gen)),
        "branch3x3": nn.Sequential(_conv(conv, cin, w3, 1, stride, True, gen), nn.ReLU(),
                                   _conv(conv, w3, w3, 3, 1, bias, gen)),
        "branch3x3dbl": nn.Sequential(_conv(conv, cin, wd, 1, stride, True, gen), nn.ReLU(),
                                      _conv(conv, wd, wd, 3, 1, True, gen), nn.ReLU(),
                                      _conv(conv, wd, wd, 3, 1, bias, gen)),
        "branch_pool": nn.Sequential(pool(3, stride=1, padding=1), _conv(conv, cin, wp, 1, stride, bias, gen)),
    })


def _insert(gm: fx.GraphModule, g: InceptionGrowth, node: fx.Node, channel_dim: int) -> None:
    """Call every branch module on the layer's input, concatenate after the layer's output, and let
    every user of the layer read the concatenation. Every new node is tagged Role.GROWN."""
    x = node.args[0] if node.args else node.kwargs["input"]
    outs = [node]
    with gm.graph.inserting_before(node.next):
        for branch in BRANCHES:
            h = x
            for k in range(len(gm.get_submodule(f"{g.name}.{branch}"))):
                h = tag(gm.graph.call_module(f"{g.name}.{branch}.{k}", (h,)), PASS, Role.GROWN, layer=g.layer)
            outs.append(h)
        cat = tag(gm.graph.call_function(torch.cat, (outs,), {"dim": channel_dim}), PASS, Role.GROWN, layer=g.layer)
    node.replace_all_uses_with(cat, delete_user_cb=lambda user: user is not cat)


def grow_inception(gm: fx.GraphModule, grown: Sequence[InceptionGrowth], seed: int = 0) -> PassResult:
    """Grow each `grown.layer` into an Inception module: its output gains sum(widths) channels.

    Before::

        conv2 = self.conv2(relu);  relu = None
        bn2 = self.bn2(conv2);  conv2 = None

    After (conv2 grown by 8 channels: 2 per branch)::

        conv2 = self.conv2(relu)
        conv2_inception_branch1x1_0 = getattr(self.conv2_inception.branch1x1, "0")(relu)
        conv2_inception_branch3x3_0 = getattr(self.conv2_inception.branch3x3, "0")(relu)
        ...
        cat = torch.cat([conv2, conv2_inception_branch1x1_0, ...], dim = 1)
        bn2 = self.bn2(cat)       # bn2 (16,) -> (24,): identity entries
                                  # and the consumer of bn2's channels gets 8 zero input columns

    The layer keeps its tensors; the group's other members widen as grow_channels widens them.
    """
    gen = torch.Generator().manual_seed(seed)
    growths = [g.growth for g in grown]
    layers = edits_of(growths)
    before = shapes_of(gm, layers)
    for layer, tensors in layers.items():
        grow_layer(gm.get_submodule(layer), tensors, gen)
    lines = []
    for g in grown:
        node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == g.layer)
        conv = gm.get_submodule(g.layer)
        gm.add_submodule(g.name, branches(conv, g.widths, gen).train(conv.training))
        out_dim = len(node.meta["tensor_meta"].shape) - (conv.weight.dim() - 1)
        _insert(gm, g, node, out_dim)
        lines.append(f"  '{g.layer}' grown into an Inception module '{g.name}': branches "
                     + ", ".join(f"{b} {w}" for b, w in zip(BRANCHES, g.widths)))
    gm.recompile()
    text = describe_growing(before, shapes_of(gm, layers), growths).replace(GROW_CHANNELS, PASS, 1)
    note(gm, PASS, "\n".join([text.splitlines()[0], *lines, *text.splitlines()[1:]]))
    return PassResult(gm, modified=bool(grown))


def without_outputs(growth: Growth, layer: str) -> Growth:
    """`growth` of every member but `layer`'s own output slices (the branches make those channels)."""
    members = tuple(m for m in growth.group.members if not (m.layer == layer and m.role == "out"))
    return dataclasses.replace(growth, group=dataclasses.replace(growth.group, members=members))
