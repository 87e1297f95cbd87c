"""The one verb: transform(model, phase="sparse" | "dense")."""
from __future__ import annotations

import contextlib
import functools
import gc
import os
from typing import Any, Mapping

import torch
from torch import fx

from dsd_fx.capture import capture
from dsd_fx.config import SparseConfig
from dsd_fx.masks import global_magnitude_masks, magnitude_mask, n_pruned
from dsd_fx.passes.insert_masks import insert_masks
from dsd_fx.passes.strip_masks import strip_masks
from dsd_fx.pipeline import PassRecord, run_passes
from dsd_fx.select import select
from dsd_fx.tags import has_dsd_nodes, tagged

PHASES = ("sparse", "dense")
_UNSET: Any = object()


@contextlib.contextmanager
def _gc_paused():
    """Rewriting a graph allocates many small objects and few cycles; the cyclic collector's passes
    over a large heap made transform() grow faster than linearly with the graph size."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def changes(gm: fx.GraphModule) -> list[PassRecord]:
    """The per-pass records of the transform that made `gm` (empty for a model dsd_fx did not make)."""
    return list(getattr(gm, "meta", {}).get("dsd_fx", {}).get("changes", []))


def _record_code() -> bool:
    return os.environ.get("DSD_FX_PRINT_CHANGED", "") not in ("", "quiet", "0")


def transform(
    model: torch.nn.Module,
    phase: str = "sparse",
    *,
    sparsity: float | Mapping[str, float] = _UNSET,
    include: Any = None,
    exclude: Any = None,
    scope: str = "layer",
    config: SparseConfig | None = None,
    copy: bool = False,
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Rewrite `model` into its sparse-phase or re-dense graph and return the new GraphModule.

    phase="sparse": trace `model` (or take a GraphModule from any tracer), give every prunable
        weight a `<name>_mask` buffer and a visible `mul` before its op, and zero the pruned
        weights. `sparsity` (default 0.5), `include`, `exclude`, `scope` are those of `SparseConfig`;
        or pass `config=`.
    phase="dense": write W * M into every masked weight (pruned weights restart from zero), remove
        every dsd_fx node and buffer and restore the original ops and parameter names.

    The returned GraphModule shares its parameter objects with `model`: training it trains
    `model`'s weights, and the commit step (zeroing pruned weights, writing W * M) changes them in
    place. Pass `copy=True` to work on a deep copy instead. Every check runs before the commit, so
    a transform that raises leaves `model` exactly as it was.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; use phase='sparse' to prune or phase='dense' to re-dense")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"transform expects an nn.Module or a torch.fx.GraphModule, got {type(model).__name__}")
    if phase == "sparse":
        if config is None:
            config = SparseConfig(
                sparsity=0.5 if sparsity is _UNSET else sparsity, include=include, exclude=exclude, scope=scope
            )
        elif sparsity is not _UNSET or include is not None or exclude is not None or scope != "layer":
            raise TypeError("give either config= or the individual options (sparsity, include, ...), not both")
        with _gc_paused():
            return _sparse(model, config, copy=copy, concrete_args=concrete_args)
    if sparsity is not _UNSET or include is not None or exclude is not None or config is not None:
        raise TypeError(
            "phase='dense' takes no sparsity options: it removes the masks the sparse phase made"
        )
    with _gc_paused():
        return _dense(model, copy=copy)


def _sparse(model: torch.nn.Module, config: SparseConfig, *, copy: bool, concrete_args) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule) and has_dsd_nodes(model.graph):
        raise ValueError(
            f"transform(phase='sparse'): {type(model).__name__} is already a sparse-phase graph "
            f"(it has {sum(1 for _ in tagged(model.graph, role='mask'))} mask nodes); "
            "re-dense it first with transform(gm, phase='dense'), then sparsify again (DSDSD)"
        )
    gm = capture(model, copy=copy, concrete_args=concrete_args)
    chosen = select(gm, config)
    if config.scope == "global":
        masks = global_magnitude_masks([w.param for w, _ in chosen], config.sparsity)
    else:
        masks = [magnitude_mask(w.param, ratio) for w, ratio in chosen]
    plan = [(w, m) for (w, _), m in zip(chosen, masks)]

    def verify(g: fx.GraphModule) -> None:
        zeros = 0
        for w, ratio in chosen:
            mask = g.get_buffer(w.mask_name)
            if mask.shape != w.param.shape:
                raise AssertionError(f"mask {w.mask_name} has shape {tuple(mask.shape)}, weight {tuple(w.param.shape)}")
            z = int((mask == 0).sum())
            zeros += z
            if config.scope == "layer" and z != n_pruned(w.param.numel(), ratio):
                raise AssertionError(f"mask {w.mask_name} prunes {z} weights, not round({ratio} * {w.param.numel()})")
        if config.scope == "global" and zeros != n_pruned(sum(w.param.numel() for w, _ in chosen), config.sparsity):
            raise AssertionError(f"global masks prune {zeros} weights in all")

    records = run_passes(gm, [("insert_masks", functools.partial(insert_masks, masks=plan))], verify, record_code=_record_code())
    # commit: the only change to the (shared) weights, after every check has passed
    with torch.no_grad():
        for w, mask in plan:
            w.param.mul_(mask)
    gm.meta["dsd_fx"] = {"phase": "sparse", "config": config, "changes": records}
    return gm


def _dense(model: torch.nn.Module, *, copy: bool) -> fx.GraphModule:
    if not isinstance(model, fx.GraphModule) or not has_dsd_nodes(model.graph):
        raise ValueError(
            f"transform(phase='dense'): {type(model).__name__} has no dsd_fx nodes, so there is nothing to "
            "re-dense; pass the GraphModule that transform(model, phase='sparse') returned"
        )
    gm = capture(model, copy=copy)
    pairs = []
    for mul in tagged(gm.graph, "insert_masks", "masked"):
        weight, mask = (gm.get_parameter(mul.args[0].target), gm.get_buffer(mul.args[1].target))
        if all(w is not weight for w, _ in pairs):
            pairs.append((weight, mask))
    keys = [k for k in gm.state_dict() if k not in {n.target for n in tagged(gm.graph, "insert_masks", "mask")}]

    def verify(g: fx.GraphModule) -> None:
        left = [n.name for n in g.graph.nodes if "dsd_fx" in n.meta]
        if left:
            raise AssertionError(f"dsd_fx nodes left after re-dense: {left}")
        if set(g.state_dict()) != set(keys):
            raise AssertionError(f"state_dict keys after re-dense {list(g.state_dict())} != {keys}")

    records = run_passes(gm, [("strip_masks", strip_masks)], verify, record_code=_record_code())
    with torch.no_grad():
        for weight, mask in pairs:
            weight.mul_(mask)
    gm.meta["dsd_fx"] = {"phase": "dense", "changes": records}
    return gm
