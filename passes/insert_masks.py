"""insert_masks: give every prunable weight use a visible mask multiplication."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from dsd_fx.ops import mask_mul
from dsd_fx.sparse.prunable import PrunableWeight
from dsd_fx.infra.rewrite import get_attr, owner_of, wrap_weight_uses
from dsd_fx.tags import Role, tag

PASS = "insert_masks"


def _masked(g: fx.Graph, weight: fx.Node, mask_name: str, pw: PrunableWeight, sole_weight_op: bool) -> fx.Node:
    mask = tag(get_attr(g, mask_name), PASS, Role.MASK_BUFFER, weight=pw.name)
    kwargs = {"grad_inplace": True} if sole_weight_op else {}
    return tag(g.call_function(mask_mul, (weight, mask), kwargs), PASS, Role.MASKED_WEIGHT, weight=pw.name)


def insert_masks(gm: fx.GraphModule, masks: Sequence[tuple[PrunableWeight, torch.Tensor]]) -> PassResult:
    """Register `<weight>_mask` buffers and multiply every use of each weight by its mask.

    Before::

        fc1 = self.fc1(x);  x = None
        relu = torch.relu(fc1)

    After::

        fc1_weight = self.fc1.weight
        fc1_weight_mask = self.fc1.weight_mask
        mask_mul = dsd_fx_ops_mask_mul(fc1_weight, fc1_weight_mask, grad_inplace = True)
        fc1_bias = self.fc1.bias
        linear = torch._C._nn.linear(x, mask_mul, fc1_bias)
        relu = torch.relu(linear)

    `mask_mul` is W * M in value and gradient (see dsd_fx.ops for why it is not `torch.mul`).
    Module calls become functional calls of the masked weight; a parameter read by `get_attr`
    gets its multiplication right after the read, once per read. One buffer per parameter, so a
    weight used several times is masked identically everywhere. Fixed N:M masks go through
    this pass too: they are masks whose zeros follow the N:M pattern.
    """
    items = []
    for pw, mask in masks:
        owner, attr = owner_of(gm, pw.mask_name)
        owner.register_buffer(attr, mask)

        def masked(g: fx.Graph, weight: fx.Node, sole: bool, pw=pw) -> fx.Node:
            return _masked(g, weight, pw.mask_name, pw, sole)

        items.append((pw, masked))
    wrap_weight_uses(gm, items, PASS)
    return PassResult(gm, modified=bool(masks))
