"""The one verb: transform(model, phase="sparse" | "dense" | "push", ...), each phase a recipe of passes."""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import fx

from dsd_fx.infra.graph_capture import capture
from dsd_fx.sparse.config import SparseConfig
from dsd_fx.diagnostics.graph_diff import diff_graphs
from dsd_fx.diagnostics.graphs import fx_to_nx
from dsd_fx.grow.config import GrowConfig
from dsd_fx.grow.plan import grow_plan
from dsd_fx.passes.insert_taps import PASS as INSERT_TAPS, insert_taps, plan_taps
from dsd_fx.infra.pipeline import NOTES, PassRecord, Plan, run_passes
from dsd_fx.diagnostics.print_changed import PrintChanged
from dsd_fx.prune.config import PruneConfig
from dsd_fx.prune.plan import prune_plan
from dsd_fx.sparse.plans import dense_capture, dense_plan, sparse_plan
from dsd_fx.tags import persist

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
        of `GrowConfig`, `example_args` required; see dsd_fx.grow.plan.

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
        gm = dense_capture(model, copy)
        plan = dense_plan(gm)
    else:
        example_args = config.example_args if phase in ("prune", "grow") else options.get("example_args")
        gm = capture(model, copy=copy, concrete_args=options.get("concrete_args"), how=options.get("capture", "auto"),
                     example_args=example_args, example_kwargs=options.get("example_kwargs"),
                     dynamic_shapes=options.get("dynamic_shapes"))
        if phase == "sparse":
            plan = sparse_plan(gm, config)
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


# ---------------------------------------------------------------- push


def _push_plan(gm: fx.GraphModule, taps) -> Plan:
    plan_taps(gm, taps)  # a bad tap list raises before any change
    return Plan([(INSERT_TAPS, functools.partial(insert_taps, taps=taps))], [], lambda: None, [])
