"""The prune phase's plan: find the channel groups, score their channels, choose, check, commit."""
from __future__ import annotations

import fnmatch
import functools
import math
from typing import Sequence

import torch
from torch import fx

from dsd_fx.channels.groups import ChannelGroup, groups_of, propagate_shapes
from dsd_fx.infra.calls import eval_mode, has_non_finite
from dsd_fx.passes.insert_taps import PASS as INSERT_TAPS
from dsd_fx.passes.prune_channels import PASS as PRUNE_CHANNELS, adopt, cut_positions, layer_cuts, prune_channels, retie
from dsd_fx.prune.hf_config import config_updates, is_transformers_model, write_config
from dsd_fx.passes.strip_taps import strip_taps
from dsd_fx.infra.pipeline import Invariant, Plan
from dsd_fx.prune.config import PruneConfig
from dsd_fx.tags import has_dsd_nodes, is_permanent, tag_of, tagged


def _slice_scores(t: torch.Tensor, member, size: int, power: int) -> torch.Tensor:
    """Per group channel: the sum of |w|^power over the slice `member` gives that channel."""
    per_index = t.detach().float().abs().pow(power).movedim(member.dim, 0).reshape(t.shape[member.dim], -1).sum(1)
    scores = torch.zeros(size)
    lo = member.offset * member.repeat
    block = per_index[lo:lo + member.length * member.repeat].reshape(member.length, member.repeat).sum(1)
    scores[member.start:member.start + member.length] = block
    return scores


def _weighed(g: ChannelGroup):
    """The members whose values are weights (not running statistics, not a bare count)."""
    return [m for m in g.members if m.tensor and m.role != "size" and not m.tensor.startswith("running_")]


def _counts(gm: fx.GraphModule, g: ChannelGroup) -> torch.Tensor:
    """Per group channel: how many weights its score sums (a global ranking compares means)."""
    n = torch.zeros(g.size)
    for m in _weighed(g):
        t = getattr(gm.get_submodule(m.layer), m.tensor)
        n[m.start:m.start + m.length] += t.numel() // t.shape[m.dim] * m.repeat
    return n.clamp(min=1)


def _checked_scores(got, g: ChannelGroup) -> torch.Tensor:
    """An importance callable's answer for `g`: a floating tensor of shape (g.size,), every score
    finite, or an error naming the group and what came back (a NaN ranks anywhere: silently wrong)."""
    where = f"for group '{g.name}' of {g.size} channels (layers {', '.join(g.producers) or '-'})"
    if not isinstance(got, torch.Tensor):
        raise TypeError(f"prune: importance callable returned a {type(got).__name__} {where}; return a float "
                        f"tensor of shape ({g.size},), e.g. torch.tensor(scores, dtype=torch.float32)")
    if not got.is_floating_point():
        raise TypeError(f"prune: importance callable returned {str(got.dtype).removeprefix('torch.')} scores {where}; "
                        "return floating scores (scores.float())")
    if got.numel() != g.size:
        raise ValueError(f"prune: importance callable gave {got.numel()} scores {where}; return one score per channel")
    if tuple(got.shape) != (g.size,):
        raise ValueError(f"prune: importance callable gave scores of shape {tuple(got.shape)} {where}; return shape "
                         f"({g.size},) (scores.flatten() if one per channel is meant)")
    scores = got.detach().float().cpu()
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"prune: importance callable gave {len(bad)} NaN or Inf score(s) {where} (channel {bad[0]}: "
                         f"{scores[bad[0]].item()}); NaN or Inf scores cannot be ranked: fix the callable")
    return scores


def _check_weights(gm: fx.GraphModule, groups: Sequence[ChannelGroup], rates: dict[int, float]) -> None:
    """Every tensor of the groups to prune is finite, as the sparse phase checks its weights: a NaN
    or Inf cannot be ranked, and pruning around it hands the user a model that computes NaN."""
    by_index = {g.index: g for g in groups}
    for i in rates:
        g = by_index[i]
        for m in g.members:
            t = getattr(gm.get_submodule(m.layer), m.tensor, None) if m.tensor and m.role != "size" else None
            if has_non_finite(t):
                raise ValueError(f"prune: '{m.layer}.{m.tensor}' holds NaN or Inf (channel group '{g.name}'); its channels "
                                 f"cannot be ranked. Fix the weights or exclude the group (exclude={[g.name]!r})")


def score(gm: fx.GraphModule, g: ChannelGroup, importance, example_args: tuple) -> torch.Tensor:
    """Importance of each of `g`'s channels: "l1" sums |w| over every slice of every member that
    belongs to the channel (producers' outputs, norm affine params, consumers' inputs); "l2" the
    root of the sum of squares; a callable is asked."""
    if callable(importance):
        return _checked_scores(importance(g, example_args), g)
    power = 1 if importance == "l1" else 2
    total = torch.zeros(g.size)
    for m in _weighed(g):
        total += _slice_scores(getattr(gm.get_submodule(m.layer), m.tensor), m, g.size, power)
    return total if power == 1 else total.sqrt()


def _match(pattern: str, g: ChannelGroup) -> bool:
    return any(fnmatch.fnmatchcase(p, pattern) for p in g.producers)


def _check_patterns(patterns: Sequence[str], groups: Sequence[ChannelGroup], option: str) -> None:
    layers = sorted({p for g in groups for p in g.producers})
    for pattern in patterns:
        hits = [g for g in groups if _match(pattern, g)]
        if not hits:
            raise ValueError(f"prune: {option} pattern {pattern!r} matches no layer that makes channels "
                             f"(layers: {', '.join(layers)}); fix the pattern")
        if option == "channels" and not any(g.prunable for g in hits):
            raise ValueError(f"prune: channels pattern {pattern!r} matches only groups that cannot be pruned: "
                             + "; ".join(f"'{g.name}' ({'; '.join(g.blocked_by) or 'one channel'})" for g in hits))


def _fractions(groups: Sequence[ChannelGroup], config: PruneConfig) -> dict[int, float]:
    """Group index -> fraction, for the prunable groups in scope."""
    for option in ("include", "exclude"):
        _check_patterns(getattr(config, option) or (), groups, option)
    if isinstance(config.channels, dict):
        _check_patterns(list(config.channels), groups, "channels")
    out = {}
    for g in groups:
        if not g.prunable or (config.include and not any(_match(p, g) for p in config.include)):
            continue
        if config.exclude and any(_match(p, g) for p in config.exclude):
            continue
        if isinstance(config.channels, dict):
            rate = next((r for p, r in config.channels.items() if _match(p, g)), None)
            if rate is not None:
                out[g.index] = rate
        else:
            out[g.index] = config.channels
    return out


def _n_removed(size: int, fraction: float, round_to: int | None) -> int:
    n = math.floor(fraction * size)
    if round_to:
        keep = min(size, math.ceil((size - n) / round_to) * round_to)
        n = size - keep
    return max(0, min(n, size - 1))


def choose(gm: fx.GraphModule, groups: Sequence[ChannelGroup], config: PruneConfig) -> dict[int, list[int]]:
    """Group index -> the channels to remove, lowest importance first (ties: lowest index)."""
    rates = _fractions(groups, config)
    if not rates:
        blocked = "; ".join(f"'{g.name}': {'; '.join(g.blocked_by) or 'one channel'}" for g in groups if not g.prunable)
        raise ValueError(f"prune: no channel group of {type(gm).__name__} can be pruned with these options "
                         f"(blocked groups: {blocked or 'none'}); check include/exclude/channels")
    by_index = {g.index: g for g in groups}
    _check_weights(gm, groups, rates)
    if config.importance == "discriminant":
        scores = _discriminant(gm, groups, rates, config)
    else:
        scores = {i: score(gm, by_index[i], config.importance, config.example_args) for i in rates}
    if config.scope == "global":
        return _global(gm, by_index, scores, config)
    out = {}
    for i, rate in rates.items():
        g = by_index[i]  # head groups: their widths are whole heads already; round_to rounds channel counts
        n = _n_removed(g.size, rate, config.round_to if g.width == 1 else None)
        out[i] = sorted(torch.argsort(scores[i], stable=True)[:n].tolist())
    return out


def _discriminant(gm: fx.GraphModule, groups: Sequence[ChannelGroup], rates: dict[int, float],
                  config: PruneConfig) -> dict[int, torch.Tensor]:
    """dsd_fx.push.scoring's scores of the groups in scope; a group that feeds no scored layer is refused."""
    from dsd_fx.push.scoring import discriminant_scores  # dsd_fx.push.objective imports phases, which imports this module

    found = discriminant_scores(gm, groups, config.data)
    missing = [groups[i].name for i in rates if i not in found]
    if missing:
        raise ValueError(f"prune: importance='discriminant' has no score for group(s) {', '.join(map(repr, missing))}: "
                         "their channels do not reach the final classifier's input through layers dsd_fx traces; "
                         f"exclude them (exclude={missing!r}) or use importance='l1'")
    return {i: found[i] for i in rates}


def _global(gm, by_index, scores, config: PruneConfig) -> dict[int, list[int]]:
    pool = []
    for i, s in scores.items():  # discriminant scores are per-group normalised already, not sums of weights
        mean = s if config.importance == "discriminant" else s / _counts(gm, by_index[i])
        pool += [(float(v), i, c) for c, v in enumerate(mean)]
    want = math.floor(config.channels * sum(by_index[i].size for i in scores))
    out: dict[int, list[int]] = {i: [] for i in scores}
    taken = 0
    for _, i, c in sorted(pool):
        if taken >= want:
            break
        if len(out[i]) < by_index[i].size - 1:
            out[i].append(c)
            taken += 1
    return {i: sorted(v) for i, v in out.items()}


def _consistent(example_args: tuple, out_shapes) -> Invariant:
    def check(gm: fx.GraphModule) -> None:
        gm.recompile()
        with eval_mode(gm, no_grad=True):
            try:
                out = gm(*example_args)
            except RuntimeError as err:
                raise AssertionError(f"the pruned graph does not run: {err}") from err
        got = [tuple(t.shape) for t in torch.utils._pytree.tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if got != out_shapes:
            raise AssertionError(f"output shapes {got}, not {out_shapes} as before pruning")
    return Invariant("channel counts consistent after pruning", check)


def _read_names(gm: fx.GraphModule) -> set[str]:
    """The qualified names of the tensors the graph reads: get_attr targets and called modules' own tensors."""
    out = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.users:
            out.add(n.target)
        elif n.op == "call_module":
            m = gm.get_submodule(n.target)
            out.update(f"{n.target}.{k}" for k in [*m._parameters, *m._buffers])
            out.update(f"{n.target}.{k}" for k, _ in m.named_parameters())
    return out


def _refuse_tied(gm: fx.GraphModule, cuts) -> None:
    """One tensor under two names (tied weights: an embedding and its LM head) is cut once, and
    stays one tensor, when every name cuts it alike; otherwise pruning would untie it: refuse."""
    per_name: dict[str, dict[int, list[int]]] = {}
    for (layer, tensor, dim), gone in cuts.items():
        if tensor:
            per_name.setdefault(f"{layer}.{tensor}" if layer else tensor, {})[dim] = gone
    names: dict[int, list[str]] = {}
    read = _read_names(gm)  # a name the graph never reads (export reads a tied weight under one name) follows the others
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if name in read:
            names.setdefault(id(t), []).append(name)
    for group in names.values():
        cut = {name: per_name.get(name, {}) for name in group}
        if len(group) > 1 and any(cut.values()) and len({repr(sorted(c.items())) for c in cut.values()}) > 1:
            raise ValueError(f"prune: {' and '.join(map(repr, group))} are one tensor (tied weights), but their channel "
                             "groups cut it differently; pruning would untie them: exclude the groups of these layers "
                             "(exclude=[...]) or prune them alike")


def _strip_push_taps(gm: fx.GraphModule) -> None:
    """A pushed graph (phase="push") is pruned in GPP's order: its taps vanish here, as re-dense strips
    them, and it is pruned as the untapped model would be (GPP.prune ranks the same way). `gm` is
    transform's own capture: the user's pushed graph keeps its taps. A graph with masks is left as
    it is, for the sparse-phase refusal."""
    made = [n for n in tagged(gm.graph) if not is_permanent(n)]
    if made and all(tag_of(n)["pass"] == INSERT_TAPS for n in made):
        strip_taps(gm)


def prune_plan(gm: fx.GraphModule, config: PruneConfig, model: torch.nn.Module):
    """The Plan of transform(phase="prune"): every check runs here or in the invariants, before
    the commit (which writes the smaller layers into `model` only with inplace=True)."""

    _strip_push_taps(gm)
    if has_dsd_nodes(gm.graph):
        raise ValueError(f"transform(phase='prune'): {type(gm).__name__} is a sparse-phase graph (it has dsd_fx mask "
                         "nodes); re-dense it first with transform(gm, phase='dense'), then prune channels")
    propagate_shapes(gm, config.example_args)
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    out_shapes = [tuple(a.meta["tensor_meta"].shape) for a in torch.utils._pytree.tree_flatten(outputs[0].args)[0]
                  if isinstance(a, fx.Node) and hasattr(a.meta.get("tensor_meta"), "shape")]
    groups = groups_of(gm, config.hidden)
    removed = choose(gm, groups, config)
    cuts = cut_positions(groups, removed)
    _refuse_tied(gm, cuts)
    mha = sorted({layer for layer, tensor, _ in cuts if tensor == "in_proj_weight"})
    if config.inplace and mha:
        raise ValueError(f"prune: inplace=True cannot write pruned heads into nn.MultiheadAttention {', '.join(map(repr, mha))}: "
                         "it needs num_heads * head_dim == embed_dim; use the returned GraphModule (its layers run the "
                         "smaller heads), or exclude these groups (exclude=[...])")
    literals = cut_positions(groups, removed, role="size")
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: its module, as capture took
    hf = config.inplace and is_transformers_model(model)
    updates = config_updates(model, cuts) if hf else {}  # raises before any change where the config cannot say it
    if config.inplace and literals and not hf:  # a transformers model's forward reads its sizes from config and tensors
        where = ", ".join(sorted({f"'{node}'" for node, _, _ in literals}))
        raise ValueError(f"prune: inplace=True cannot rewrite the sizes that {type(model).__name__}'s forward writes as "
                         f"numbers (head counts or widths in {where}); use the returned GraphModule, or exclude these "
                         "groups (exclude=[...])")

    def commit() -> None:
        if not config.inplace:
            return
        renamed = {}
        for layer, tensors in layer_cuts(cuts).items():
            theirs, mine = model.get_submodule(layer), gm.get_submodule(layer)
            renamed.update({id(getattr(theirs, name)): getattr(mine, name) for name in tensors if name})
            adopt(theirs, mine, tensors)
        retie(model, renamed)
        if updates:
            write_config(model, updates)

    recipe = [(PRUNE_CHANNELS, functools.partial(prune_channels, groups=groups, removed=removed))]
    return Plan(recipe, [_consistent(config.example_args, out_shapes)], commit, [])
