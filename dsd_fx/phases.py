"""The one verb: transform(model, phase="sparse" | "dense" | "push", ...), each phase a recipe of passes."""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import fx

from dsd_fx.capture import capture
from dsd_fx.config import SparseConfig
from dsd_fx.graph_diff import diff_graphs
from dsd_fx.graphs import fx_to_nx
from dsd_fx.grow_config import GrowConfig
from dsd_fx.grow_plan import grow_plan
from dsd_fx.masks import global_magnitude_masks, magnitude_mask, n_pruned, nm_mask
from dsd_fx.packing import unpack_tensor
from dsd_fx.passes.fold_masks import redense_plan
from dsd_fx.passes.insert_masks import insert_masks
from dsd_fx.passes.insert_nm import insert_nm
from dsd_fx.passes.insert_taps import insert_taps, plan_taps
from dsd_fx.passes.pack_nm import pack_nm
from dsd_fx.pipeline import NOTES, Invariant, PassRecord, Plan, run_passes
from dsd_fx.print_changed import PrintChanged
from dsd_fx.prunable import PrunableWeight
from dsd_fx.rewrite import owner_of
from dsd_fx.prune_config import PruneConfig
from dsd_fx.prune_plan import prune_plan
from dsd_fx.selection import select_nm, select_weights
from dsd_fx.state import STATE, MaskKind, MaskRecord, TransformState, keep_mask, masks_of, state_of
from dsd_fx.tags import Role, has_dsd_nodes, persist, tag_of, tagged

TRANSFORM_OPTIONS = ("copy", "concrete_args", "capture", "example_args", "example_kwargs", "dynamic_shapes",
                     "print_changed", "print_changed_dir", "print_changed_passes")
CAPTURE_OPTIONS = ("concrete_args", "capture", "example_args", "example_kwargs", "dynamic_shapes")


def changes(gm: fx.GraphModule) -> list[PassRecord]:
    """The per-pass records of the transform that made `gm` (empty for a model dsd_fx did not make)."""
    return list(getattr(gm, "meta", {}).get("dsd_fx", {}).get("changes", []))


# the options each phase takes beside TRANSFORM_OPTIONS
PHASE_OPTIONS: dict[str, tuple[str, ...]] = {
    "sparse": SparseConfig.option_names(), "dense": (), "push": ("taps",), "prune": PruneConfig.option_names(),
    "grow": GrowConfig.option_names(),
}
CONFIGS = {"sparse": SparseConfig, "prune": PruneConfig, "grow": GrowConfig}  # the phases whose options are one frozen config
PHASES = tuple(PHASE_OPTIONS)


def transform(
    model: torch.nn.Module, phase: str = "sparse", *, config: SparseConfig | PruneConfig | GrowConfig | None = None, **options: Any
) -> fx.GraphModule:
    """Rewrite `model` into the graph of `phase` and return the new GraphModule.

    phase="sparse": trace `model` (or take a GraphModule from any tracer), give every prunable
        weight a `<name>_mask` buffer and a visible mask op before its use, and zero the pruned
        weights. The sparse options (`sparsity` (default 0.5), `include`, `exclude`, `scope`,
        `pattern`, `method`, `lambda_w`, `pack`, `strict`, `embeddings`, `kernel`) are the fields of
        `SparseConfig`, which validates them; or pass `config=SparseConfig(...)` instead.
    phase="dense": write W * M into every masked weight (pruned weights restart from zero), remove
        every dsd_fx node, tap and buffer and restore the original ops and parameter names.
    phase="push": tap the layers `taps` names (default: the final classifier's input), so that each
        forward records their activations for `dsd_fx.push_loss(gm, labels)`; outputs bitwise unchanged.
    phase="prune": remove whole channels (dsd_fx.channel_groups) and return a GraphModule whose
        layers are smaller, under the same parameter names; `model` is untouched unless
        inplace=True. Its options (`channels` (default 0.25), `importance`, `example_args`
        (required), `round_to`, `scope`, `include`, `exclude`, `inplace`) are the fields of
        `PruneConfig`, or pass `config=PruneConfig(...)`.
    phase="grow": widen the channel groups of the layers `at` names by `width` channels, function-preserving
        (`how`="zeros" | "net2net"), or grow each into an Inception module (`how`="inception"); fields
        of `GrowConfig`, `example_args` required; see dsd_fx.grow_plan.

    The returned GraphModule shares its parameter objects with `model` (unless `copy=True`): the
    commit step (zeroing pruned weights, writing W * M) changes them in place. Every check and every
    diagnostic runs before the commit, so a transform that raises leaves `model` exactly as it was.

    print_changed ("quiet", "diff", "cdiff"), print_changed_dir and print_changed_passes show each
    pass that changed the graph, like LLVM's -print-changed (also set by the environment variables
    DSD_FX_PRINT_CHANGED, DSD_FX_PRINT_CHANGED_DIR, DSD_FX_PRINT_CHANGED_PASSES). `concrete_args`
    goes to torch.fx's tracer.

    Capture (every phase but dense): capture="auto" (default) traces with torch.fx and, where fx
    fails and `example_args` are given, captures with torch.export (non-strict); capture="fx" and
    capture="export" choose one. torch.export takes `example_args` (a tuple of the forward's
    positional inputs), `example_kwargs` and `dynamic_shapes` (default: every dimension of every
    example tensor Dim.AUTO, so the graph runs at other batch sizes and lengths). `model` may also
    be an ExportedProgram or its `.module()`. An exported graph switches dropout and batch norm
    with train()/eval(), like the model. `dsd_fx.changes(gm)` lists the passes and, when recorded, their diffs.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; use phase='sparse' to prune weights, phase='dense' to re-dense, "
                         "phase='push' to tap layers for the push loss, phase='prune' to remove channels or "
                         "phase='grow' to add them")
    if not isinstance(model, (torch.nn.Module, torch.export.ExportedProgram)):
        raise TypeError(f"transform expects an nn.Module, a torch.fx.GraphModule or a torch.export.ExportedProgram, "
                        f"got {type(model).__name__}")
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()  # its graph over the model's own parameter objects
    config = _phase_config(phase, config, options)
    printer = PrintChanged.resolve(options.get("print_changed"), options.get("print_changed_dir"), options.get("print_changed_passes"))
    printer.check()  # an unwritable diff folder fails here, before any work
    copy = bool(options.get("copy", False))
    if phase == "dense":
        gm = _dense_capture(model, copy)
        plan = _dense_plan(gm)
    else:
        example_args = config.example_args if phase in ("prune", "grow") else options.get("example_args")
        gm = capture(model, copy=copy, concrete_args=options.get("concrete_args"), how=options.get("capture", "auto"),
                     example_args=example_args, example_kwargs=options.get("example_kwargs"),
                     dynamic_shapes=options.get("dynamic_shapes"))
        if phase == "sparse":
            plan = _sparse_plan(gm, config)
        elif phase == "prune":
            plan = prune_plan(gm, config, model)
        elif phase == "grow":
            plan = grow_plan(gm, config, model)
        else:
            plan = _push_plan(gm, options.get("taps"))
    observer = _DiffObserver() if printer.active else None
    records = run_passes(gm, plan.recipe, plan.invariants, final=plan.final, observer=observer)
    gm.meta["dsd_fx"] = {"changes": records}
    persist(gm)
    printer.emit(records, phase)  # diagnostics: before the commit, so a failing one changes nothing
    plan.commit()
    return gm


def _phase_config(phase: str, config, options: dict):
    """Check that every option belongs to `phase`; the phase's frozen config (CONFIGS), built once."""
    own = PHASE_OPTIONS[phase]
    unknown = sorted(set(options) - {o for opts in PHASE_OPTIONS.values() for o in opts} - set(TRANSFORM_OPTIONS))
    if unknown:
        by_phase = "; ".join(f"phase={p!r}: {', '.join(o) or 'none'}" for p, o in PHASE_OPTIONS.items())
        raise TypeError(f"transform got unknown option(s) {', '.join(unknown)}. Options by phase: {by_phase}; "
                        f"every phase: {', '.join(TRANSFORM_OPTIONS)}")
    cls = CONFIGS.get(phase)
    foreign = sorted(k for k in options if k not in own and k not in TRANSFORM_OPTIONS)
    foreign += ["config"] if config is not None and cls is None else []
    if foreign and phase == "dense":
        raise TypeError(f"phase='dense' takes no sparsity options (got {', '.join(foreign)}): it removes what the sparse and push phases made")
    if foreign:
        raise TypeError(f"phase={phase!r} does not take {', '.join(foreign)}")
    captures = [k for k in CAPTURE_OPTIONS if k in options]
    if phase == "dense" and captures:
        raise TypeError(f"phase='dense' takes no {', '.join(captures)}: it does not capture, it rewrites the sparse graph it is given")
    if cls is None:
        return None
    given = sorted(k for k in options if k in own)
    if config is not None and given:
        raise TypeError(f"give either config= or the {phase} options ({', '.join(given)}), not both")
    if config is not None and not isinstance(config, cls):
        raise TypeError(f"phase={phase!r} takes config=dsd_fx.{cls.__name__}(...), got {type(config).__name__}")
    return config if config is not None else cls(**{k: options[k] for k in given})


class _DiffObserver:
    """The pipeline's observer when diffs are asked for: each changed pass's structural diff, with
    the pass's note where its change is one the code does not show (shapes: prune, grow)."""

    def before(self, gm: fx.GraphModule):
        return gm.code, fx_to_nx(gm)

    def after(self, name: str, snapshot, gm: fx.GraphModule):
        code, graph = snapshot
        diff = diff_graphs(graph, fx_to_nx(gm), code, gm.code, name)
        text = gm.meta.get(NOTES, {}).get(name)
        if text:
            diff.code = f"{diff.code}\n{text}" if diff.code else text
        return diff


# ---------------------------------------------------------------- sparse


def _push_plan(gm: fx.GraphModule, taps) -> Plan:
    plan_taps(gm, taps)  # a bad tap list raises before any change
    return Plan([("insert_taps", functools.partial(insert_taps, taps=taps))], [], lambda: None, [])


SPARSE_PASSES = ("insert_masks", "insert_nm", "pack_nm")


def _sparse_plan(gm: fx.GraphModule, config: SparseConfig) -> Plan:
    # the record, or (where it was lost) the nodes the sparse passes tagged
    if state_of(gm) is not None or any(tag_of(n)["pass"] in SPARSE_PASSES for n in tagged(gm.graph)):
        raise ValueError(
            f"transform(phase='sparse'): {gm.__class__.__name__} is already a sparse-phase graph "
            f"(it has {sum(1 for _ in tagged(gm.graph, role=Role.MASKED_WEIGHT))} masked weights); "
            "re-dense it first with transform(gm, phase='dense'), then sparsify again (DSDSD)"
        )
    chosen = select_weights(gm, config)
    if config.criterion == "wanda":  # calibrates on a tapped copy: a batch that does not fit raises here, before any change
        plan = wanda_plan(gm, chosen, config)
    elif config.nm is None:
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


def wanda_plan(gm: fx.GraphModule, chosen: list[tuple[PrunableWeight, float]], config: SparseConfig) -> Plan:
    """Fixed masks from Wanda's scores: per output row for a fraction, per group of M for an N:M pattern."""
    from dsd_fx.wanda import row_mask, wanda_out_dim

    if config.nm is not None:
        return _nm_plan(chosen, config, scores=lambda ws: _wanda_scores(gm, ws, config.data))
    weights = [(w, ratio, wanda_out_dim(gm, w)) for w, ratio in chosen]
    scores = _wanda_scores(gm, [w for w, _, _ in weights], config.data)
    plan = [(w, row_mask(scores[w.name], ratio, out).to(w.param.dtype)) for w, ratio, out in weights]
    records = [MaskRecord(w.name, MaskKind.BUFFER, buffer=w.mask_name) for w, _, _ in weights]

    def rows(g: fx.GraphModule) -> None:
        for w, ratio, out in weights:
            pruned = (g.get_buffer(w.mask_name) == 0).movedim(out, 0).flatten(1).sum(1)
            want = n_pruned(w.param.numel() // w.param.shape[out], ratio)
            if not bool((pruned == want).all()):
                raise AssertionError(f"mask {w.mask_name} does not prune {want} weights in every output row")

    return _buffer_plan(plan, records, [Invariant("sparsity as asked in every output row", rows)])


def _wanda_scores(gm: fx.GraphModule, weights: list[PrunableWeight], data) -> dict[str, torch.Tensor]:
    from dsd_fx.wanda import input_norms, wanda_scores

    norms = input_norms(gm, weights, data)
    return {w.name: wanda_scores(w.param, norms[w.name]) for w in weights}


def _nm_groups(keep: torch.Tensor, n: int, m: int, dim: int, name: str) -> None:
    counts = keep.movedim(dim, -1).reshape(-1, m).ne(0).sum(1)
    if not bool((counts == n).all()):
        raise AssertionError(f"{name}: not exactly {n} of every {m} kept")


def _nm_plan(chosen, config: SparseConfig, scores=None) -> Plan:
    """N:M masks; `scores(weights) -> {name: score}` ranks instead of |W| (Wanda) for a fixed pattern."""
    n, m = config.nm
    weights = select_nm(chosen, n, m, config.strict)
    if config.method == "fixed":
        ranked = scores([w for w, _ in weights]) if scores is not None else {w.name: w.param for w, _ in weights}
        plan = [(w, nm_mask(ranked[w.name], n, m, dim).to(w.param.dtype)) for w, dim in weights]
        records = [MaskRecord(w.name, MaskKind.BUFFER, buffer=w.mask_name, n=n, m=m, dim=dim) for w, dim in weights]

        def kept(g: fx.GraphModule) -> None:
            for w, dim in weights:
                _nm_groups(g.get_buffer(w.mask_name), n, m, dim, w.name)

        return _buffer_plan(plan, records, [Invariant("N of M kept", kept)])
    lam = config.effective_lambda
    records = [MaskRecord(w.name, MaskKind.DYNAMIC, n=n, m=m, dim=dim, lambda_w=lam) for w, dim in weights]

    def pattern(g: fx.GraphModule) -> None:  # every dynamic weight has its op, with the record's pattern
        want = {r.weight: (r.n, r.m, r.dim, r.lambda_w) for r in records}
        seen = set()
        for node in tagged(g.graph, role=Role.MASKED_WEIGHT):
            weight = tag_of(node)["weight"]
            got = tuple(node.args[1:5]) if node.target is torch.ops.dsd_fx.sparsify_nm.default else None
            if got != want[weight]:
                raise AssertionError(f"{node.name} computes {node.target} (n, m, dim, lambda_w) = {got}, not sparsify_nm {want[weight]}")
            seen.add(weight)
        if seen != set(want):
            raise AssertionError(f"no sparsify_nm op for {', '.join(sorted(set(want) - seen))}")

    recipe = [("insert_nm", functools.partial(insert_nm, weights=weights, n=n, m=m, lambda_w=lam))]
    return Plan(recipe, [Invariant("N:M pattern of every dynamic mask", pattern)], lambda: None, records)


def _packed_plan(gm: fx.GraphModule, chosen, config: SparseConfig) -> Plan:
    n, m = config.nm
    weights = select_nm(chosen, n, m, config.strict)
    records = []
    for w, dim in weights:
        owner, _ = owner_of(gm, w.name)
        records.append(MaskRecord(w.name, MaskKind.PACKED, n=n, m=m, dim=dim, param=w.param,
                                  shape=tuple(w.param.shape), order=tuple(owner._parameters)))

    def unpacks(g: fx.GraphModule) -> None:  # packed storage unpacks to W * M of the user's dense W
        records = {r.weight: r for r in masks_of(g)}
        for w, dim in weights:
            _nm_groups(keep_mask(g, records[w.name]), n, m, dim, w.name)
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
    """Every read of a sparse weight's Parameter (by any name, by get_attr or inside a module call)
    feeds dsd_fx's own nodes only; a packed weight is read nowhere."""
    sparse = {id(g.get_parameter(r.weight)): r.weight for r in masks_of(g) if r.kind is not MaskKind.PACKED}
    packed = {r.weight for r in masks_of(g) if r.kind is MaskKind.PACKED}
    for node in g.graph.nodes:
        if node.op == "get_attr":
            if node.target in packed:
                raise AssertionError(f"packed weight {node.target} is still read by {node.name}")
            param = g._parameters.get(node.target) if "." not in node.target else None
            if param is None:
                path, _, attr = node.target.rpartition(".")
                param = getattr(g.get_submodule(path), "_parameters", {}).get(attr) if path else None
            bare = [u.name for u in node.users if tag_of(u) is None] if param is not None and id(param) in sparse else []
            if bare:
                raise AssertionError(f"weight {sparse[id(param)]} reaches {', '.join(bare)} unmasked")
        elif node.op == "call_module":
            inside = [sparse[id(p)] for p in g.get_submodule(node.target).parameters() if id(p) in sparse]
            if inside:
                raise AssertionError(f"module call {node.name} reads sparse weight(s) {', '.join(inside)} unmasked")


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
