"""The sparse and re-dense phases' plans: each a recipe of passes, its invariants and its commit."""
from __future__ import annotations

import functools

import torch
from torch import fx

from dsd_fx.infra.graph_capture import capture
from dsd_fx.infra.pipeline import Invariant, Plan
from dsd_fx.infra.rewrite import owner_of
from dsd_fx.passes.fold_masks import redense_plan
from dsd_fx.passes.insert_masks import PASS as INSERT_MASKS, insert_masks
from dsd_fx.passes.insert_nm import PASS as INSERT_NM, insert_nm
from dsd_fx.passes.pack_nm import PASS as PACK_NM, pack_nm
from dsd_fx.sparse.config import SparseConfig
from dsd_fx.sparse.masks import global_magnitude_masks, magnitude_mask, n_pruned, nm_mask
from dsd_fx.sparse.packing import unpack_tensor
from dsd_fx.sparse.prunable import PrunableWeight
from dsd_fx.sparse.selection import select_nm, select_weights
from dsd_fx.state import STATE, MaskKind, MaskRecord, TransformState, keep_mask, masks_of, state_of
from dsd_fx.tags import Role, has_dsd_nodes, tag_of, tagged

# ---------------------------------------------------------------- sparse


SPARSE_PASSES = (INSERT_MASKS, INSERT_NM, PACK_NM)


def sparse_plan(gm: fx.GraphModule, config: SparseConfig) -> Plan:
    # the record, or (where it was lost) the nodes the sparse passes tagged
    if state_of(gm) is not None or any(tag_of(n)["pass"] in SPARSE_PASSES for n in tagged(gm.graph)):
        # every sparse weight, packed ones included (a packed weight has no masked-weight node)
        records = masks_of(gm)
        packed = sum(r.kind is MaskKind.PACKED for r in records) if records else \
            sum(1 for _ in tagged(gm.graph, role=Role.PACKED_VALUES))
        count = len(records) if records else sum(1 for _ in tagged(gm.graph, role=Role.MASKED_WEIGHT)) + packed
        raise ValueError(
            f"transform(phase='sparse'): {gm.__class__.__name__} is already a sparse-phase graph "
            f"(it has {count} sparse weights, {packed} of them packed); "
            "re-dense it first with transform(gm, phase='dense'), then sparsify again (DSDSD)"
        )
    chosen = select_weights(gm, config)
    if config.criterion == "wanda":  # calibrates on a tapped copy: a batch that does not fit raises here, before any change
        plan = _wanda_plan(gm, chosen, config)
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

    recipe = [(INSERT_MASKS, functools.partial(insert_masks, masks=plan))]
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


def _wanda_plan(gm: fx.GraphModule, chosen: list[tuple[PrunableWeight, float]], config: SparseConfig) -> Plan:
    """Fixed masks from Wanda's scores: per output row for a fraction, per group of M for an N:M pattern."""
    from dsd_fx.sparse.wanda import row_mask, wanda_out_dim

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
    from dsd_fx.sparse.wanda import input_norms, wanda_scores

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

    recipe = [(INSERT_NM, functools.partial(insert_nm, weights=weights, n=n, m=m, lambda_w=lam))]
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

    recipe = [(PACK_NM, functools.partial(pack_nm, weights=weights, n=n, m=m, kernel=config.kernel))]
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


def dense_capture(model: torch.nn.Module, copy: bool) -> fx.GraphModule:
    if not isinstance(model, fx.GraphModule) or not has_dsd_nodes(model.graph):
        raise ValueError(
            f"transform(phase='dense'): {type(model).__name__} has no dsd_fx nodes, so there is nothing to "
            "re-dense; pass the GraphModule that transform(model, phase='sparse') returned"
        )
    return capture(model, copy=copy)


def dense_plan(gm: fx.GraphModule) -> Plan:
    recipe, final, commit = redense_plan(gm)
    return Plan(recipe, [], commit, [], tuple(final))
