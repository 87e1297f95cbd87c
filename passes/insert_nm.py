"""insert_nm: SR-STE's dynamic N:M sparsification, one custom op per weight use."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from dsd_fx.sparse.prunable import PrunableWeight
from dsd_fx.infra.rewrite import wrap_weight_uses
from dsd_fx.tags import Role, tag

PASS = "insert_nm"


def insert_nm(gm: fx.GraphModule, weights: Sequence[tuple[PrunableWeight, int]], n: int, m: int, lambda_w: float) -> PassResult:
    """Feed every use of each weight through `dsd_fx::sparsify_nm`, whose mask is recomputed each step.

    Before::

        fc1 = self.fc1(x);  x = None

    After::

        fc1_weight = self.fc1.weight
        sparsify_nm = torch.ops.dsd_fx.sparsify_nm.default(fc1_weight, 2, 4, 1, 0.0002, True)
        fc1_bias = self.fc1.bias
        linear = torch._C._nn.linear(x, sparsify_nm, fc1_bias)

    The forward is W * nm_mask(W); the backward is the straight-through gradient plus
    lambda_w * (1 - M) * W (SR-STE; lambda_w = 0 is plain STE). No buffer: the mask is a function
    of the weights.
    """
    op = torch.ops.dsd_fx.sparsify_nm.default
    items = []
    for pw, dim in weights:

        def sparsified(g: fx.Graph, weight: fx.Node, sole: bool, pw=pw, dim=dim) -> fx.Node:
            # sole: W~ feeds one matmul-like op only, so the backward may write W's gradient into W~
            args = (weight, n, m, dim, float(lambda_w)) + ((True,) if sole else ())
            return tag(g.call_function(op, args), PASS, Role.MASKED_WEIGHT, weight=pw.name)

        items.append((pw, sparsified))
    wrap_weight_uses(gm, items, PASS)
    return PassResult(gm, modified=bool(weights))
