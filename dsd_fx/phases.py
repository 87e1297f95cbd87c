"""The one verb: transform(model, phase="sparse" | "dense", ...), each phase a recipe of passes."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

from dsd_fx.capture import capture
from dsd_fx.config import SparseConfig
from dsd_fx.diff import diff_graphs, fx_to_nx
from dsd_fx.masks import global_magnitude_masks, magnitude_mask, n_pruned, nm_mask
from dsd_fx.packing import unpack_nm as unpack_tensor
from dsd_fx.passes.fold_masks import redense_plan
from dsd_fx.passes.insert_masks import insert_masks
from dsd_fx.passes.insert_nm import insert_nm
from dsd_fx.passes.pack_nm import pack_nm
from dsd_fx.pipeline import Invariant, PassRecord, run_passes
from dsd_fx.print_changed import PrintChanged
from dsd_fx.prune_config import PruneConfig
from dsd_fx.prune_plan import PruningObserver, prune_plan
from dsd_fx.prunable import PrunableWeight, select_nm, select_weights
from dsd_fx.state import STATE, MaskKind, MaskRecord, TransformState, current_masks, masks_of
from dsd_fx.tags import Role, has_dsd_nodes, snapshot, tagged

TRANSFORM_OPTIONS = ("copy", "concrete_args", "print_changed", "print_changed_dir", "print_changed_passes")


def changes(gm: fx.GraphModule) -> list[PassRecord]:
    """The per-pass records of the transform that made `gm` (empty for a model dsd_fx did not make)."""
    return list(getattr(gm, "meta", {}).get("dsd_fx", {}).get("changes", []))


@dataclass
class Plan:
    """A phase's work: the passes with their invariants, the record, and the commit that runs
    only after every check and every diagnostic has passed."""

    recipe: list
    invariants: list[Invariant]
    commit: Callable[[], None]
    records: list[MaskRecord]
    final: tuple = ()


def transform(model: torch.nn.Module, phase: str = "sparse", *, config: SparseConfig | PruneConfig | None = None, **options: Any) -> fx.GraphModule:
    """Rewrite `model` into its sparse-phase or re-dense graph and return the new GraphModule.

    phase="sparse": trace `model` (or take a GraphModule from any tracer), give every prunable
        weight a `<name>_mask` buffer and a visible mask op before its use, and zero the pruned
        weights. The sparse options (`sparsity` (default 0.5), `include`, `exclude`, `scope`,
        `pattern`, `method`, `lambda_w`, `pack`, `strict`, `embeddings`, `kernel`) are the fields of
        `SparseConfig`, which validates them; or pass `config=SparseConfig(...)` instead.
    phase="dense": write W * M into every masked weight (pruned weights restart from zero), remove
        every dsd_fx node and buffer and restore the original ops and parameter names. It takes no
        sparse option.
    phase="prune": remove whole channels (dsd_fx.channels groups) and return a GraphModule whose
        layers are smaller, under the same parameter names; `model` is untouched unless
        inplace=True. Its options (`channels` (default 0.25), `importance`, `example_args`
        (required), `round_to`, `scope`, `include`, `exclude`, `inplace`) are the fields of
        `PruneConfig`, or pass `config=PruneConfig(...)`.

    The returned GraphModule shares its parameter objects with `model`: training it trains
    `model`'s weights, and the commit step (zeroing pruned weights, writing W * M) changes them in
    place. Pass `copy=True` to work on a deep copy instead. Every check and every diagnostic runs
    before the commit, so a transform that raises leaves `model` exactly as it was.

    print_changed ("quiet", "diff", "cdiff"), print_changed_dir and print_changed_passes show each
    pass that changed the graph, like LLVM's -print-changed (also set by the environment variables
    DSD_FX_PRINT_CHANGED, DSD_FX_PRINT_CHANGED_DIR, DSD_FX_PRINT_CHANGED_PASSES). `concrete_args`
    goes to torch.fx's tracer. `dsd_fx.changes(gm)` lists the passes and, when recorded, their diffs.
    """
    if phase not in ("sparse", "dense", "prune"):
        raise ValueError(f"unknown phase {phase!r}; use phase='sparse' to prune, phase='dense' to re-dense "
                         "or phase='prune' to remove channels")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"transform expects an nn.Module or a torch.fx.GraphModule, got {type(model).__name__}")
    if phase == "prune":
        return _prune(model, config, options)
    sparse = {k: v for k, v in options.items() if k in SparseConfig.option_names()}
    unknown = sorted(set(options) - set(sparse) - set(TRANSFORM_OPTIONS))
    if unknown:
        raise TypeError(
            f"transform got unknown option(s) {', '.join(unknown)}; the sparse options are "
            f"{', '.join(SparseConfig.option_names())}, and every phase takes {', '.join(TRANSFORM_OPTIONS)}"
        )
    if phase == "dense":
        if sparse or config is not None:
            given = sorted(sparse) + (["config"] if config is not None else [])
            raise TypeError(f"phase='dense' takes no sparsity options (got {', '.join(given)}): it removes the masks the sparse phase made")
        if "concrete_args" in options:
            raise TypeError("phase='dense' takes no concrete_args: it does not trace")
    elif config is not None and sparse:
        raise TypeError(f"give either config= or the sparse options ({', '.join(sorted(sparse))}), not both")
    elif config is None:
        config = SparseConfig(**sparse)
    elif not isinstance(config, SparseConfig):
        raise TypeError(f"config must be a dsd_fx.SparseConfig, got {type(config).__name__}")
    printer = PrintChanged.resolve(options.get("print_changed"), options.get("print_changed_dir"), options.get("print_changed_passes"))
    copy = bool(options.get("copy", False))
    if phase == "sparse":
        gm = capture(model, copy=copy, concrete_args=options.get("concrete_args"))
        plan = _sparse_plan(gm, config)
    else:
        gm = _dense_capture(model, copy)
        plan = _dense_plan(gm)
    observer = _DiffObserver() if printer.active else None
    records = run_passes(gm, plan.recipe, plan.invariants, final=plan.final, observer=observer)
    gm.meta["dsd_fx"] = {"changes": records}
    if phase == "sparse":
        gm.get_submodule(STATE).tags = snapshot(gm.graph)
    printer.emit(records, phase)  # diagnostics: before the commit, so a failing one changes nothing
    plan.commit()
    return gm


def _prune(model: torch.nn.Module, config: PruneConfig | None, options: dict[str, Any]) -> fx.GraphModule:
    """phase="prune": the PruneConfig fields are its options (see dsd_fx.prune_config)."""
    pruning = {k: v for k, v in options.items() if k in PruneConfig.option_names()}
    unknown = sorted(set(options) - set(pruning) - set(TRANSFORM_OPTIONS))
    if unknown:
        raise TypeError(f"transform(phase='prune') got unknown option(s) {', '.join(unknown)}; the prune options are "
                        f"{', '.join(PruneConfig.option_names())}, and every phase takes {', '.join(TRANSFORM_OPTIONS)}")
    if config is not None and not isinstance(config, PruneConfig):
        raise TypeError(f"phase='prune' takes config=dsd_fx.PruneConfig(...), got {type(config).__name__}")
    if config is not None and pruning:
        raise TypeError(f"give either config= or the prune options ({', '.join(sorted(pruning))}), not both")
    config = config or PruneConfig(**pruning)
    printer = PrintChanged.resolve(options.get("print_changed"), options.get("print_changed_dir"), options.get("print_changed_passes"))
    gm = capture(model, copy=bool(options.get("copy", False)), concrete_args=options.get("concrete_args"))
    plan = prune_plan(gm, config, model)
    observer = PruningObserver(_DiffObserver()) if printer.active else None
    gm.meta["dsd_fx"] = {"changes": run_passes(gm, plan.recipe, plan.invariants, observer=observer)}
    printer.emit(gm.meta["dsd_fx"]["changes"], "prune")
    plan.commit()
    return gm


class _DiffObserver:
    """The pipeline's observer when diffs are asked for: each changed pass's structural diff."""

    def before(self, gm: fx.GraphModule):
        return gm.code, fx_to_nx(gm)

    def after(self, name: str, snapshot, gm: fx.GraphModule):
        code, graph = snapshot
        return diff_graphs(graph, fx_to_nx(gm), code, gm.code, name)


# ---------------------------------------------------------------- sparse


def _sparse_plan(gm: fx.GraphModule, config: SparseConfig) -> Plan:
    if has_dsd_nodes(gm.graph):
        raise ValueError(
            f"transform(phase='sparse'): {gm.__class__.__name__} is already a sparse-phase graph "
            f"(it has {sum(1 for _ in tagged(gm.graph, role=Role.MASKED_WEIGHT))} masked weights); "
            "re-dense it first with transform(gm, phase='dense'), then sparsify again (DSDSD)"
        )
    chosen = select_weights(gm, config)
    if config.nm is None:
        plan = _magnitude_plan(chosen, config)
    elif config.pack:
        plan = _packed_plan(gm, chosen, config)
    else:
        plan = _nm_plan(chosen, config)
    gm.add_module(STATE, TransformState(config.describe([r.weight for r in plan.records]), plan.records))
    plan.invariants = [Invariant("every use of a sparse weight is masked", _all_uses_masked), *plan.invariants]
    return plan


def _buffer_plan(plan: list[tuple[PrunableWeight, torch.Tensor]], records: list[MaskRecord], invariants: list[Invariant]) -> Plan:
    def commit() -> None:
        with torch.no_grad():
            for w, mask in plan:
                w.param.mul_(mask)

    def shapes(g: fx.GraphModule) -> None:
        for w, _ in plan:
            mask = g.get_buffer(w.mask_name)
            if mask.shape != w.param.shape:
                raise AssertionError(f"mask {w.mask_name} has shape {tuple(mask.shape)}, weight {tuple(w.param.shape)}")

    recipe = [("insert_masks", functools.partial(insert_masks, masks=plan))]
    return Plan(recipe, [Invariant("mask shape = weight shape", shapes), *invariants], commit, records)


def _magnitude_plan(chosen: list[tuple[PrunableWeight, float]], config: SparseConfig) -> Plan:
    if config.scope == "global":
        masks = global_magnitude_masks([w.param for w, _ in chosen], config.sparsity)
    else:
        masks = [magnitude_mask(w.param, ratio) for w, ratio in chosen]
    plan = [(w, m) for (w, _), m in zip(chosen, masks)]

    def counts(g: fx.GraphModule) -> None:
        zeros = {w.name: int((g.get_buffer(w.mask_name) == 0).sum()) for w, _ in chosen}
        if config.scope == "global":
            want = n_pruned(sum(w.param.numel() for w, _ in chosen), config.sparsity)
            if sum(zeros.values()) != want:
                raise AssertionError(f"global masks prune {sum(zeros.values())} weights in all, not {want}")
            return
        for w, ratio in chosen:
            if zeros[w.name] != n_pruned(w.param.numel(), ratio):
                raise AssertionError(f"mask {w.mask_name} prunes {zeros[w.name]} weights, not round({ratio} * {w.param.numel()})")

    records = [MaskRecord(w.name, MaskKind.BUFFER, buffer=w.mask_name) for w, _ in chosen]
    return _buffer_plan(plan, records, [Invariant("sparsity as asked", counts)])


def _nm_groups(keep: torch.Tensor, n: int, m: int, dim: int, name: str) -> None:
    counts = keep.movedim(dim, -1).reshape(-1, m).ne(0).sum(1)
    if not bool((counts == n).all()):
        raise AssertionError(f"{name}: not exactly {n} of every {m} kept")


def _nm_plan(chosen, config: SparseConfig) -> Plan:
    n, m = config.nm
    weights = select_nm(chosen, n, m, config.strict)
    if config.method == "fixed":
        plan = [(w, nm_mask(w.param, n, m, dim)) for w, dim in weights]
        records = [MaskRecord(w.name, MaskKind.BUFFER, buffer=w.mask_name, n=n, m=m, dim=dim) for w, dim in weights]

        def kept(g: fx.GraphModule) -> None:
            for w, dim in weights:
                _nm_groups(g.get_buffer(w.mask_name), n, m, dim, w.name)

        return _buffer_plan(plan, records, [Invariant("N of M kept", kept)])
    lam = config.effective_lambda
    records = [MaskRecord(w.name, MaskKind.DYNAMIC, n=n, m=m, dim=dim, lambda_w=lam) for w, dim in weights]

    def pattern(g: fx.GraphModule) -> None:  # the op of every use carries the record's pattern
        want = {r.weight: (r.n, r.m, r.dim, r.lambda_w) for r in records}
        for node in tagged(g.graph, role=Role.MASKED_WEIGHT):
            got = tuple(node.args[1:5])
            if got != want[node.meta["dsd_fx"]["weight"]]:
                raise AssertionError(f"{node.name} computes (n, m, dim, lambda_w) = {got}, not {want[node.meta['dsd_fx']['weight']]}")

    recipe = [("insert_nm", functools.partial(insert_nm, weights=weights, n=n, m=m, lambda_w=lam))]
    return Plan(recipe, [Invariant("N:M pattern of every dynamic mask", pattern)], lambda: None, records)


def _packed_plan(gm: fx.GraphModule, chosen, config: SparseConfig) -> Plan:
    n, m = config.nm
    weights = select_nm(chosen, n, m, config.strict)
    records = []
    for w, dim in weights:
        path, _, attr = w.name.rpartition(".")
        owner = gm.get_submodule(path) if path else gm
        records.append(MaskRecord(w.name, MaskKind.PACKED, n=n, m=m, dim=dim, param=w.param,
                                  shape=tuple(w.param.shape), order=tuple(owner._parameters)))

    def unpacks(g: fx.GraphModule) -> None:  # packed storage unpacks to W * M of the user's dense W
        keep = current_masks(g)
        for w, dim in weights:
            _nm_groups(keep[w.name], n, m, dim, w.name)
            dense = unpack_tensor(g.get_parameter(f"{w.name}_values"), g.get_buffer(f"{w.name}_meta"), n, m, dim)
            if not torch.equal(dense.reshape(w.param.shape), w.param.detach() * nm_mask(w.param, n, m, dim)):
                raise AssertionError(f"{w.name}: the packed storage does not unpack to W * M")

    def commit() -> None:  # the dense storage goes: the packed values are the weight now
        with torch.no_grad():
            for w, _ in weights:
                w.param.data = w.param.data.new_empty(0)

    recipe = [("pack_nm", functools.partial(pack_nm, weights=weights, n=n, m=m, kernel=config.kernel))]
    return Plan(recipe, [Invariant("packed storage unpacks to W * M, N of M kept", unpacks)], commit, records)


def _all_uses_masked(g: fx.GraphModule) -> None:
    """No get_attr of a masked (or packed) weight feeds anything but dsd_fx's own nodes."""
    for r in masks_of(g):
        for node in g.graph.nodes:
            if node.op != "get_attr" or node.target != r.weight:
                continue
            if r.kind is MaskKind.PACKED:
                raise AssertionError(f"packed weight {r.weight} is still read by {node.name}")
            bare = [u.name for u in node.users if "dsd_fx" not in u.meta]
            if bare:
                raise AssertionError(f"weight {r.weight} reaches {', '.join(bare)} unmasked")


# ---------------------------------------------------------------- dense


def _dense_capture(model: torch.nn.Module, copy: bool) -> fx.GraphModule:
    if not isinstance(model, fx.GraphModule) or not has_dsd_nodes(model.graph):
        raise ValueError(
            f"transform(phase='dense'): {type(model).__name__} has no dsd_fx nodes, so there is nothing to "
            "re-dense; pass the GraphModule that transform(model, phase='sparse') returned"
        )
    return capture(model, copy=copy)


def _dense_plan(gm: fx.GraphModule) -> Plan:
    recipe, final, commit = redense_plan(gm)
    return Plan(recipe, [], commit, [], tuple(final))
