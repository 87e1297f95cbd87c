"""Which prunable weights a sparse config selects, with their sparsity: the checks before any change."""
from __future__ import annotations

import difflib
import fnmatch
import warnings
from typing import Callable, Iterable

import torch
from torch import fx

from dsd_fx.sparse.config import SparseConfig
from dsd_fx.op_table import known_ops, module_row
from dsd_fx.sparse.prunable import PrunableWeight, find_prunable, resolve


def _matches(pattern: str, weight: PrunableWeight) -> bool:
    return any(fnmatch.fnmatchcase(n, pattern) for n in weight.names())


def _no_match_error(what: str, pattern: str, weights: Iterable[PrunableWeight]) -> ValueError:
    names = sorted(w.name for w in weights)
    near = difflib.get_close_matches(pattern, sorted({n for w in weights for n in w.names()}), n=3)
    hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    return ValueError(
        f"{what} pattern {pattern!r} matches no prunable weight.{hint} "
        f"Prunable weights: {', '.join(names)}. Patterns are fnmatch globs on the weight name "
        "('encoder.*.weight') or the layer name ('encoder.0.fc1')."
    )


def _filter(weights: list[PrunableWeight], patterns, keep: bool, what: str, opt_in=()) -> list[PrunableWeight]:
    if patterns is None:
        return weights
    if callable(patterns):
        pred: Callable[[PrunableWeight], bool] = patterns
        return [w for w in weights if bool(pred(w)) == keep]
    for p in patterns:
        if not any(_matches(p, w) for w in weights):
            embedding = [w.name for w in opt_in if _matches(p, w)]
            if embedding and not keep:  # excluding what is not pruned anyway
                continue
            if embedding:
                raise ValueError(
                    f"{what} pattern {p!r} names nn.Embedding weight(s) {', '.join(embedding)}, which are "
                    "opt-in; pass embeddings=True to prune embeddings"
                )
            raise _no_match_error(what, p, weights)
    return [w for w in weights if any(_matches(p, w) for p in patterns) == keep]


def _check_usable(gm: fx.GraphModule, weights: list[PrunableWeight]) -> None:
    """Refuse parameters that some op we cannot rewrite reads inside a module call."""
    chosen = {id(w.param): w for w in weights}
    functional = {n for w in weights for n in w.modules}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node in functional:
            continue
        module = gm.get_submodule(node.target)
        for pname, p in module.named_parameters():
            if id(p) in chosen:
                w = chosen[id(p)]
                raise ValueError(
                    f"select: weight '{w.name}' is also read inside module '{node.target}' "
                    f"({type(module).__name__}, as '{pname}'), where dsd_fx cannot apply its mask; "
                    f"exclude it (exclude=['{w.name}'])"
                )
    for w in weights:
        for node in w.modules:
            module = gm.get_submodule(node.target)
            if module._forward_hooks or module._forward_pre_hooks:
                raise ValueError(
                    f"select: layer '{node.target}' has forward hooks, which a functional call would skip; "
                    f"remove the hooks or exclude it (exclude=['{node.target}'])"
                )
            row = module_row(module)  # a layer without a row is called as it is (ops.module_call): nothing dropped
            dropped = row.dropped_args if row is not None else ()
            if dropped and (len(node.args) > 1 or node.kwargs):
                raise ValueError(
                    f"select: layer '{node.target}' is called with {' or '.join(dropped)}, which dsd_fx cannot make "
                    f"functional; call it without {' or '.join(dropped)} or exclude it (exclude=['{node.target}'])"
                )


def select_weights(gm: fx.GraphModule, config: SparseConfig) -> list[tuple[PrunableWeight, float]]:
    """The weights to prune under `config`, each with its sparsity; raises before any change."""
    candidates = find_prunable(gm)
    if not candidates:
        raise ValueError(
            f"select: {type(gm).__name__} has no prunable weight: no parameter of 2 or more dimensions is "
            f"used by an op dsd_fx knows ({known_ops()}; nn.Embedding with embeddings=True). "
            "Is the model's weight held in a module type dsd_fx does not know? A function op can be "
            "taught with dsd_fx.op_table.register_function"
        )
    embedding_only = [w for w in candidates if all(u.row.opt_in for u in w.uses)]
    if not config.embeddings:
        candidates = [w for w in candidates if w not in embedding_only]
        if not candidates:
            raise ValueError(
                f"select: {type(gm).__name__}'s only prunable weights are nn.Embedding tables "
                f"({', '.join(w.name for w in embedding_only)}), which are opt-in; pass embeddings=True"
            )
    weights = _filter(candidates, config.include, True, "include", embedding_only)
    weights = _filter(weights, config.exclude, False, "exclude", embedding_only)
    if isinstance(config.sparsity, dict):
        chosen = []
        for pattern in config.sparsity:
            if not any(_matches(pattern, w) for w in weights):
                raise _no_match_error("sparsity", pattern, weights or candidates)
        for w in weights:
            ratio = next((r for p, r in config.sparsity.items() if _matches(p, w)), None)
            if ratio is not None:
                chosen.append((w, ratio))
    else:
        chosen = [(w, config.sparsity) for w in weights]  # None under an N:M pattern
    if not chosen:
        raise ValueError(
            "select: include/exclude leave no weight to prune; prunable weights are: "
            + ", ".join(w.name for w in candidates)
        )
    _check_usable(gm, [w for w, _ in chosen])
    for w, _ in chosen:
        if not w.param.dtype.is_floating_point:
            raise TypeError(f"select: weight '{w.name}' has dtype {w.param.dtype}; dsd_fx prunes floating-point weights only; exclude it")
        if w.param.is_meta:
            raise ValueError(f"select: weight '{w.name}' is on the meta device and has no values to rank; load real weights first")
    finite = torch.stack([torch.isfinite(w.param.detach()).all().to("cpu") for w, _ in chosen])
    for (w, _), ok in zip(chosen, finite.tolist()):
        if not ok:
            raise ValueError(f"select: weight '{w.name}' holds NaN or Inf; magnitudes cannot be ranked. Fix the weights or exclude it")
    suffixes = ("_values", "_meta") if config.pack else ("_mask",) if config.method == "fixed" else ()
    for w, _ in chosen:
        owner = resolve(gm, w.layer) if w.layer else gm
        attr = w.name.rpartition(".")[2]
        for made in (attr + suffix for suffix in suffixes):
            if any(made in d for d in (owner.__dict__, owner._parameters, owner._buffers, owner._modules)):
                raise ValueError(
                    f"select: layer '{w.layer or type(gm).__name__}' already has an attribute '{made}', the name dsd_fx "
                    "gives to what it adds; is this model already sparse? Re-dense it first (transform(gm, phase='dense')), "
                    f"or rename that attribute, or exclude the layer (exclude=['{w.name}'])"
                )
    return chosen


def reduction_dim(w: PrunableWeight) -> int:
    """The one dimension N:M groups run along for every use of `w`; raises if uses disagree."""
    dims = {u.reduction_dim for u in w.uses}
    if None in dims:
        uses = ", ".join(f"{u.node.name} ({u.kind})" for u in w.uses if u.reduction_dim is None)
        raise ValueError(
            f"select: weight '{w.name}' is contracted along several dimensions (or none) by {uses}; an N:M "
            f"pattern needs one reduction dimension. Use unstructured sparsity for it, or exclude it "
            f"(exclude=['{w.name}'])"
        )
    if len(dims) != 1:
        uses = ", ".join(f"{u.node.name} ({u.kind}, dim {u.reduction_dim})" for u in w.uses)
        raise ValueError(
            f"select: weight '{w.name}' is used along different reduction dimensions ({uses}); an N:M "
            f"pattern can follow only one. Exclude it (exclude=['{w.name}'])"
        )
    return dims.pop()


def select_nm(
    chosen: list[tuple[PrunableWeight, object]], n: int, m: int, strict: bool
) -> list[tuple[PrunableWeight, int]]:
    """The weights an N:M pattern can cover, each with its reduction dim; skips (or, strict, refuses) the rest."""
    keep, skipped = [], []
    for w, _ in chosen:
        dim = reduction_dim(w)
        size = w.param.shape[dim]
        if size % m:
            skipped.append((w.name, size))
        else:
            keep.append((w, dim))
    if skipped and strict:
        raise ValueError(
            f"select: {n}:{m} needs reduction sizes divisible by {m}; "
            + ", ".join(f"layer '{name.rpartition('.')[0]}' has {size}" for name, size in skipped)
            + ". Exclude those layers, pad them, or pass strict=False to skip them"
        )
    if skipped:
        warnings.warn(
            f"dsd_fx: {n}:{m} skips {len(skipped)} weight(s) whose reduction size is not divisible by {m}: "
            + ", ".join(f"{name} ({size})" for name, size in skipped),
            stacklevel=3,
        )
    if not keep:
        raise ValueError(f"select: no weight has a reduction size divisible by {m}; nothing to make {n}:{m} sparse")
    return keep
