"""fold_masks: the re-dense rewrite and its commit: W * M into the weights, every dsd_fx node and tap gone."""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from dsd_fx.infra.pipeline import Invariant, Pass, run_passes
from dsd_fx.state import STATE, MaskKind, masks_of, refills
from dsd_fx.tags import META_KEY, has_dsd_nodes, is_permanent
from dsd_fx.taps import recorder_of

from dsd_fx.passes.strip_masks import PASS as STRIP_MASKS, strip_masks
from dsd_fx.passes.strip_taps import PASS as STRIP_TAPS, strip_taps
from dsd_fx.passes.unpack_nm import PASS as UNPACK_NM, unpack_nm

PASS = "fold_masks"


def _is_dsd_fx_op(target: object) -> bool:
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace == "dsd_fx"
    return getattr(target, "__module__", "") in ("dsd_fx.ops", "dsd_fx.taps")


def redense_plan(gm: fx.GraphModule) -> tuple[list[tuple[str, Pass]], list[Invariant], Callable[[], None]]:
    """(recipe, final invariants, commit) that make sparse-phase `gm` dense again.

    The recipe removes the graph's record and every node and buffer dsd_fx made; `commit()`
    then writes W * M into the weights (pruned weights restart from zero) and refills packed
    weights, under their original names. Nothing is written before `commit()` is called.
    """
    records = masks_of(gm)
    tapped = recorder_of(gm) is not None
    if not records and not tapped:
        raise ValueError(
            f"{type(gm).__name__} has dsd_fx nodes but no dsd_fx record ({STATE}); it was not made by "
            "dsd_fx.transform, or its record was removed. Re-dense the GraphModule transform returned"
        )
    pending = refills(gm)  # references taken before the passes drop the masks and the packed storage
    keys = {k for k in gm.state_dict() if not k.startswith(f"{STATE}.")}
    for r in records:
        if r.kind is MaskKind.BUFFER:
            keys.discard(r.buffer)
        elif r.kind is MaskKind.PACKED:
            keys = (keys - {r.values, r.meta}) | {r.weight}

    def drop_record(g: fx.GraphModule) -> PassResult:
        g._modules.pop(STATE, None)
        return PassResult(g, modified=False)  # the graph is unchanged

    def nothing_left(g: fx.GraphModule) -> None:
        # by tag and by what the nodes call: an untagged dsd_fx op would be caught too
        left = [n.name for n in g.graph.nodes if (META_KEY in n.meta and not is_permanent(n)) or _is_dsd_fx_op(n.target)]
        if left:
            raise AssertionError(f"dsd_fx nodes left after re-dense: {left}")
        if set(g.state_dict()) != keys:
            raise AssertionError(f"state_dict keys after re-dense {sorted(g.state_dict())} != {sorted(keys)}")

    def commit() -> None:
        for refill in pending:  # one weight at a time: no second copy of the model
            refill.commit()

    recipe = [(UNPACK_NM, functools.partial(unpack_nm, records=records)), (STRIP_MASKS, strip_masks), ("drop_record", drop_record)]
    if tapped:  # taps first: strip_masks rebuilds the graph and would copy them untagged
        recipe.insert(0, (STRIP_TAPS, strip_taps))
    return recipe, [Invariant("nothing of dsd_fx left after re-dense", nothing_left)], commit


def fold_masks(gm: fx.GraphModule) -> PassResult:
    """Fold the masks of a sparse-phase graph into its weights, in place: export's view of a
    mid-phase model. Run it on a copy (`copy.deepcopy(gm)`) to keep the training graph.

    Before::

        mask_mul = dsd_fx_ops_mask_mul(fc1_weight, fc1_weight_mask, grad_inplace = True)
        linear = torch._C._nn.linear(x, mask_mul, fc1_bias)

    After (with fc1.weight now W * M)::

        fc1 = self.fc1(x)
    """
    if not has_dsd_nodes(gm.graph):
        return PassResult(gm, modified=False)
    recipe, final, commit = redense_plan(gm)
    run_passes(gm, recipe, final=final)
    commit()
    return PassResult(gm, modified=True)
