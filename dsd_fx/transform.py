"""The one verb: transform(model, phase="sparse" | "dense")."""
from __future__ import annotations

import contextlib
import functools
import gc
import json
from typing import Any, Mapping

import torch
from torch import fx

from dsd_fx.capture import capture
from dsd_fx.config import SparseConfig
from dsd_fx.masks import global_magnitude_masks, magnitude_mask, n_pruned, nm_mask
from dsd_fx.packing import unpack_nm as unpack_tensor
from dsd_fx.passes.insert_masks import insert_masks
from dsd_fx.passes.insert_nm import insert_nm
from dsd_fx.passes.pack_nm import PACKED_ATTR, pack_nm
from dsd_fx.passes.strip_masks import strip_masks
from dsd_fx.passes.unpack_nm import unpack_nm
from dsd_fx.pipeline import PassRecord, run_passes
from dsd_fx.print_changed import PrintChanged
from dsd_fx.select import select, select_nm
from dsd_fx.tags import PERSIST_ATTR, has_dsd_nodes, persist, tagged

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


def transform(
    model: torch.nn.Module,
    phase: str = "sparse",
    *,
    sparsity: float | Mapping[str, float] = _UNSET,
    include: Any = None,
    exclude: Any = None,
    scope: str = "layer",
    pattern: str | None = None,
    method: str = "fixed",
    lambda_w: float = 2e-4,
    pack: bool = False,
    strict: bool = False,
    embeddings: bool = False,
    config: SparseConfig | None = None,
    copy: bool = False,
    concrete_args: dict[str, Any] | None = None,
    print_changed: str | None = None,
    print_changed_dir: str | None = None,
    print_changed_passes: list[str] | None = None,
) -> fx.GraphModule:
    """Rewrite `model` into its sparse-phase or re-dense graph and return the new GraphModule.

    phase="sparse": trace `model` (or take a GraphModule from any tracer), give every prunable
        weight a `<name>_mask` buffer and a visible `mul` before its op, and zero the pruned
        weights. `sparsity` (default 0.5), `include`, `exclude`, `scope`, and for N:M sparsity
        `pattern` ("2:4"), `method` ("fixed", "sr-ste", "ste"), `lambda_w`, `pack`, `strict`, `embeddings` are
        those of `SparseConfig`; or pass `config=`.
    phase="dense": write W * M into every masked weight (pruned weights restart from zero), remove
        every dsd_fx node and buffer and restore the original ops and parameter names.

    The returned GraphModule shares its parameter objects with `model`: training it trains
    `model`'s weights, and the commit step (zeroing pruned weights, writing W * M) changes them in
    place. Pass `copy=True` to work on a deep copy instead. Every check runs before the commit, so
    a transform that raises leaves `model` exactly as it was.

    print_changed ("quiet", "diff", "cdiff"), print_changed_dir and print_changed_passes show each
    pass that changed the graph, like LLVM's -print-changed (also set by the environment variables
    DSD_FX_PRINT_CHANGED, DSD_FX_PRINT_CHANGED_DIR, DSD_FX_PRINT_CHANGED_PASSES); passes that
    changed nothing print nothing. `dsd_fx.changes(gm)` lists the passes and, when recorded, their diffs.
    """
    printer = PrintChanged.resolve(print_changed, print_changed_dir, print_changed_passes)
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; use phase='sparse' to prune or phase='dense' to re-dense")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"transform expects an nn.Module or a torch.fx.GraphModule, got {type(model).__name__}")
    if phase == "sparse":
        if config is None:
            config = SparseConfig(
                sparsity=None if sparsity is _UNSET else sparsity, include=include, exclude=exclude, scope=scope,
                pattern=pattern, method=method, lambda_w=lambda_w, pack=pack, strict=strict,
                embeddings=embeddings,
            )
        elif (sparsity is not _UNSET or include is not None or exclude is not None or scope != "layer"
              or pattern is not None or method != "fixed" or pack or strict or embeddings):
            raise TypeError("give either config= or the individual options (sparsity, include, ...), not both")
        with _gc_paused():
            gm = _sparse(model, config, copy=copy, concrete_args=concrete_args, record=printer.active)
        printer.emit(changes(gm), "sparse")
        return gm
    if sparsity is not _UNSET or include is not None or exclude is not None or config is not None or pattern is not None:
        raise TypeError(
            "phase='dense' takes no sparsity options: it removes the masks the sparse phase made"
        )
    with _gc_paused():
        gm = _dense(model, copy=copy, record=printer.active)
    printer.emit(changes(gm), "dense")
    return gm


STATE = "_dsd_fx"  # the submodule of a sparse-phase graph that says, in its state_dict, how it was made


class SparseState(torch.nn.Module):
    """The options a sparse-phase model was made with, saved in its state_dict as
    `_dsd_fx._extra_state` (JSON bytes in a uint8 tensor, so that the state_dict stays all tensors,
    safetensors included); loading a checkpoint made with other options raises, naming them."""

    def __init__(self, info: dict) -> None:
        super().__init__()
        self.info = json.loads(json.dumps(info))  # as it will read back

    def get_extra_state(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(json.dumps(self.info, sort_keys=True).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        state = json.loads(bytes(state.cpu().tolist()).decode()) if isinstance(state, torch.Tensor) else state
        if state == self.info:
            return
        keys = [k for k in {**state, **self.info} if state.get(k) != self.info.get(k)]
        diffs = "; ".join(f"{k}: checkpoint {state.get(k)!r}, this model {self.info.get(k)!r}" for k in keys)
        raise ValueError(
            f"load_state_dict: this checkpoint comes from a sparse-phase model made with other options ({diffs}). "
            "Transform a fresh model with the checkpoint's options, then load it"
        )

    @staticmethod
    def describe(config: SparseConfig, weights) -> dict:
        info = {"format": 1, "pattern": config.pattern, "method": config.method, "pack": config.pack,
                "sparsity": config.sparsity, "scope": config.scope, "weights": sorted(w.name for w in weights)}
        if config.method != "fixed":
            info["lambda_w"] = config.effective_lambda
        return info


def _finish_sparse(gm: fx.GraphModule, config: SparseConfig, weights, records) -> fx.GraphModule:
    gm.add_module(STATE, SparseState(SparseState.describe(config, weights)))
    gm.meta["dsd_fx"] = {"phase": "sparse", "config": config, "changes": records}
    persist(gm)
    return gm


def _sparse(model: torch.nn.Module, config: SparseConfig, *, copy: bool, concrete_args, record: bool) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule) and has_dsd_nodes(model.graph):
        raise ValueError(
            f"transform(phase='sparse'): {type(model).__name__} is already a sparse-phase graph "
            f"(it has {sum(1 for _ in tagged(model.graph, role='mask'))} mask nodes); "
            "re-dense it first with transform(gm, phase='dense'), then sparsify again (DSDSD)"
        )
    gm = capture(model, copy=copy, concrete_args=concrete_args)
    chosen = select(gm, config)
    if config.nm is not None:
        return _sparse_nm(gm, chosen, config, record)
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

    records = run_passes(gm, [("insert_masks", functools.partial(insert_masks, masks=plan))], verify, record_code=record)
    # commit: the only change to the (shared) weights, after every check has passed
    with torch.no_grad():
        for w, mask in plan:
            w.param.mul_(mask)
    return _finish_sparse(gm, config, [w for w, _ in chosen], records)


def _sparse_nm(gm: fx.GraphModule, chosen, config: SparseConfig, record: bool) -> fx.GraphModule:
    n, m = config.nm
    weights = select_nm(chosen, n, m, config.strict)

    def verify_groups(g: fx.GraphModule, name: str, mask: torch.Tensor, dim: int) -> None:
        counts = mask.movedim(dim, -1).reshape(-1, m).ne(0).sum(1)
        if not bool((counts == n).all()):
            raise AssertionError(f"{name}: not exactly {n} of every {m} kept")

    if config.pack:
        recipe = [("pack_nm", functools.partial(pack_nm, weights=weights, n=n, m=m))]

        def verify(g: fx.GraphModule) -> None:
            for w, dim in weights:
                values = g.get_parameter(f"{w.name}_values")
                meta = g.get_buffer(f"{w.name}_meta")
                dense = unpack_tensor(values, meta, n, m, dim)
                if tuple(dense.shape) != tuple(w.param.shape):
                    raise AssertionError(f"{w.name}: packed weight unpacks to {tuple(dense.shape)}")
                verify_groups(g, w.name, nm_mask(w.param, n, m, dim), dim)

    elif config.method == "fixed":
        plan = [(w, nm_mask(w.param, n, m, dim)) for w, dim in weights]
        recipe = [("insert_masks", functools.partial(insert_masks, masks=plan))]

        def verify(g: fx.GraphModule) -> None:
            for w, dim in weights:
                verify_groups(g, w.name, g.get_buffer(w.mask_name), dim)

    else:
        recipe = [("insert_nm", functools.partial(insert_nm, weights=weights, n=n, m=m, lambda_w=config.effective_lambda))]
        verify = None
    records = run_passes(gm, recipe, verify, record_code=record)
    with torch.no_grad():  # commit
        if config.pack:  # the dense storage goes: the packed values are the weight now
            for w, _ in weights:
                w.param.data = w.param.data.new_empty(0)
        elif config.method == "fixed":
            for w, mask in plan:
                w.param.mul_(mask)
        # SR-STE/STE keep the dense weights: the optimizer updates them, the mask follows them
    return _finish_sparse(gm, config, [w for w, _ in weights], records)


def _dense(model: torch.nn.Module, *, copy: bool, record: bool) -> fx.GraphModule:
    if not isinstance(model, fx.GraphModule) or not has_dsd_nodes(model.graph):
        raise ValueError(
            f"transform(phase='dense'): {type(model).__name__} has no dsd_fx nodes, so there is nothing to "
            "re-dense; pass the GraphModule that transform(model, phase='sparse') returned"
        )
    gm = capture(model, copy=copy)
    gm._modules.pop(STATE, None)
    gm.__dict__.pop(PERSIST_ATTR, None)
    old_keys = set(gm.state_dict())
    pairs, seen = [], set()  # (weight, mask) to commit W * M
    for node in tagged(gm.graph, role="masked"):
        weight = gm.get_parameter(node.args[0].target)
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        if isinstance(node.args[1], fx.Node):  # mask_mul(W, M)
            pairs.append((weight, gm.get_buffer(node.args[1].target)))
        else:  # sparsify_nm(W, n, m, dim, lambda_w): the final mask follows the final weights
            _, n, m, dim, _ = node.args
            pairs.append((weight, nm_mask(weight, n, m, dim)))
    unpacked = []  # (parameter, dense values) to commit for packed weights
    drop = {n.target for n in tagged(gm.graph, role="mask")}
    for prefix, module in gm.named_modules():
        for attr, info in module.__dict__.get(PACKED_ATTR, {}).items():
            name = f"{prefix}.{attr}" if prefix else attr
            values, meta = module.get_parameter(f"{attr}_values"), module.get_buffer(f"{attr}_meta")
            dense = unpack_tensor(values.detach(), meta, info["n"], info["m"], info["dim"]).reshape(info["shape"])
            unpacked.append((info["param"], dense.contiguous()))
            drop |= {f"{name}_values", f"{name}_meta"}
            old_keys.add(name)
    keys = old_keys - drop

    def verify(g: fx.GraphModule) -> None:
        left = [n.name for n in g.graph.nodes if "dsd_fx" in n.meta]
        if left:
            raise AssertionError(f"dsd_fx nodes left after re-dense: {left}")
        if set(g.state_dict()) != keys:
            raise AssertionError(f"state_dict keys after re-dense {sorted(g.state_dict())} != {sorted(keys)}")

    recipe = [("unpack_nm", unpack_nm), ("strip_masks", strip_masks)]
    records = run_passes(gm, recipe, final=verify, record_code=record)
    with torch.no_grad():
        for weight, mask in pairs:
            weight.mul_(mask)
        for param, dense in unpacked:
            param.data = dense
    gm.meta["dsd_fx"] = {"phase": "dense", "changes": records}
    return gm
