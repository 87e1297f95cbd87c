"""Activation-aware masks (Wanda, Sun et al. 2023): |W_ij| * ||X_j||_2 over calibration batches, recorded by taps.

Wanda scores each weight by its magnitude times the L2 norm, over every token of the calibration
batches (batch and sequence positions flattened together), of the input feature it multiplies, and
compares the scores within each output row (unstructured sparsity) or within each group of M along
the reduction dimension (N:M). The input features are recorded the way the push records its
activations: `insert_taps` on a throw-away copy of the graph (which shares the model's parameters),
one forward per calibration batch in eval mode under `no_grad`, then the copy is dropped. Ops whose
input is a feature vector are scored: Linear-like ops (`nn.Linear`, `F.linear`, `x @ W`, `addmm`)
and 1-d/2-d convolutions, whose input is unfolded into the patches each weight row reads.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from dsd_fx.sparse.masks import n_pruned
from dsd_fx.op_table import function_row, slot_arg
from dsd_fx.sparse.prunable import PrunableWeight, WeightUse

LINEAR_KINDS = ("linear", "matmul", "mm", "addmm")
CONV_KINDS = {"conv1d": 1, "conv2d": 2}
FIX = "exclude it (exclude=['{name}']) or use criterion='magnitude'"


@dataclass(frozen=True)
class FeatureUse:
    """Where one use of a weight reads its input: the node feeding it and how its features map onto the weight."""

    weight: str
    kind: str  # "linear" (features on the input's last dim) or "conv1d" / "conv2d" (channels, unfolded)
    x: fx.Node
    out_dim: int  # the weight's output-row dimension: Wanda compares scores within each row
    in_dim: int  # the weight's input-feature dimension (linear kinds)
    conv: tuple | None = None  # (kernel, stride, padding, dilation, groups, padding_mode) for convolutions


def _conv_options(module: nn.Module | None, node: fx.Node, spatial: int) -> tuple:
    def tup(v):
        return (v,) * spatial if isinstance(v, int) else tuple(v)

    if module is not None:
        return (tuple(module.kernel_size), tuple(module.stride), module.padding if isinstance(module.padding, str)
                else tuple(module.padding), tuple(module.dilation), module.groups, module.padding_mode)
    args = list(node.args) + [None] * 7
    kw = node.kwargs
    stride = kw.get("stride", args[3] if args[3] is not None else 1)
    padding = kw.get("padding", args[4] if args[4] is not None else 0)
    dilation = kw.get("dilation", args[5] if args[5] is not None else 1)
    groups = kw.get("groups", args[6] if args[6] is not None else 1)
    return (None, tup(stride), padding if isinstance(padding, str) else tup(padding), tup(dilation), groups, "zeros")


def _refuse(w: PrunableWeight, kind: str, why: str) -> ValueError:
    return ValueError(f"criterion='wanda': weight '{w.name}' is used by a {kind} op, {why}; " + FIX.format(name=w.name))


def _consumers(use: WeightUse) -> list[tuple[fx.Node, int]]:
    """(op node, index of the weight's slot) for a get_attr use: every op of the use's row that reads it."""
    out = []
    for user in use.node.users:
        if function_row(user) is not use.row:
            continue
        for i, slot in enumerate(use.row.slots_of()):
            if slot_arg(user, slot) is use.node:
                out.append((user, i))
    return out


def feature_uses(gm: fx.GraphModule, w: PrunableWeight) -> list[FeatureUse]:
    """Every use of `w` with the node of its input, or ValueError for an op Wanda cannot score."""
    found = []
    for use in w.uses:
        kind = use.kind
        if kind not in LINEAR_KINDS and kind not in CONV_KINDS:
            raise _refuse(w, kind, "whose input is not one feature vector per weight column (Wanda scores "
                                   "Linear-like ops and 1-d/2-d convolutions)")
        if use.node.op == "call_module":
            module = gm.get_submodule(use.node.target)
            x = use.node.args[0] if use.node.args else use.node.kwargs.get("input")
            sites = [(x, module, use.node)]
        else:
            sites = []
            for op, i in _consumers(use):
                slots = use.row.slots_of()
                others = [s for j, s in enumerate(slots) if j != i]
                if kind in ("matmul", "mm", "addmm"):
                    if slots[i].reduction != -2:
                        raise _refuse(w, kind, "as its first operand (W @ x: the features are x's rows)")
                    sites.append((slot_arg(op, others[0]), None, op))
                else:
                    sites.append((op.args[0] if op.args else op.kwargs.get("input"), None, op))
        for x, module, op in sites:
            if not isinstance(x, fx.Node):
                raise _refuse(w, kind, f"whose input is the constant {x!r}, not a graph value")
            if kind in CONV_KINDS:
                conv = _conv_options(module, op, CONV_KINDS[kind])
                found.append(FeatureUse(w.name, kind, x, 0, 1, conv))
            elif w.param.dim() != 2:
                raise _refuse(w, kind, f"with a weight of {w.param.dim()} dimensions (Wanda scores 2-d weights)")
            else:
                in_dim = use.reduction_dim % 2
                found.append(FeatureUse(w.name, "linear", x, 1 - in_dim, in_dim))
    return found


def _conv_squares(x: torch.Tensor, f: FeatureUse, weight: torch.Tensor) -> torch.Tensor:
    """Sum over batch and positions of the squared unfolded input: (in_channels, *kernel), one entry per patch feature."""
    spatial = CONV_KINDS[f.kind]
    kernel = tuple(weight.shape[2:])
    _, stride, padding, dilation, _, mode = f.conv
    if x.dim() == spatial + 1:
        x = x.unsqueeze(0)
    if spatial == 1:  # a 1-d convolution is a 2-d one over a height of 1
        x, kernel = x.unsqueeze(2), (1, *kernel)
        stride, dilation = (1, *stride), (1, *dilation)
        padding = padding if isinstance(padding, str) else (0, *padding)
    if isinstance(padding, str) or mode != "zeros":
        if padding == "valid":
            pad = [0, 0, 0, 0]
        else:
            if padding == "same":
                totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
                lr = [(t // 2, t - t // 2) for t in totals]
            else:
                lr = [(p, p) for p in padding]
            pad = [v for pair in reversed(lr) for v in pair]  # F.pad: last dim first
        x = F.pad(x, pad, mode="constant" if mode == "zeros" else mode)
        padding = (0, 0)
    cols = F.unfold(x.float(), kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C*kh*kw, L)
    squares = cols.square().sum(dim=(0, 2))
    return squares.view(x.shape[1], *weight.shape[2:])


def _squares(x: torch.Tensor, f: FeatureUse, weight: torch.Tensor) -> torch.Tensor:
    if f.kind in CONV_KINDS:
        return _conv_squares(x, f, weight)
    features = weight.shape[f.in_dim]
    if x.shape[-1] != features:
        raise ValueError(f"criterion='wanda': the input of '{f.weight}' has {x.shape[-1]} features on its last "
                         f"dimension, the weight takes {features}")
    return x.detach().float().reshape(-1, features).square().sum(0)


def _broadcast(norm: torch.Tensor, f: FeatureUse, weight: torch.Tensor) -> torch.Tensor:
    """The input norms laid out as `weight`: entry (o, j, ...) holds the norm of the feature weight[o, j, ...] multiplies."""
    if f.kind in CONV_KINDS:
        groups = f.conv[4]
        per_group = norm.view(groups, weight.shape[1], *weight.shape[2:])
        return per_group.repeat_interleave(weight.shape[0] // groups, dim=0)
    return norm.unsqueeze(f.out_dim)


def _as_args(batch) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def input_norms(gm: fx.GraphModule, weights: list[PrunableWeight], data: Iterable) -> dict[str, torch.Tensor]:
    """{weight name: ||X_j||_2 laid out as the weight}, over every token of every batch of `data`.

    A weight read by several ops sums the squares of all their inputs. Runs the calibration on a
    tapped copy of `gm`; the parameters it shares are only read, and every buffer (batch-norm
    statistics an exported train-mode graph updates in place) is restored after, so nothing changes.
    Raises ValueError, naming the batch, when a batch does not fit the model or `data` is empty.
    """
    from dsd_fx.infra.graph_capture import capture
    from dsd_fx.passes.insert_taps import insert_taps, plan_taps
    from dsd_fx.taps import recorder_of

    uses = {w.name: feature_uses(gm, w) for w in weights}
    tapped = capture(gm)
    by_name = {n.name: n for n in tapped.graph.nodes}
    sources = sorted({f.x.name for fs in uses.values() for f in fs}, key=list(by_name).index)
    planned = plan_taps(tapped, sources)
    key_of = {node.name: key for key, node in planned}
    missing = sorted(set(sources) - set(key_of))  # a node name that is also a module's name taps that module's calls
    if missing:
        raise ValueError(f"criterion='wanda': cannot tap the inputs {missing} by node name; rename the module of that name")
    insert_taps(tapped, sources)
    tapped.recompile()
    tapped.eval()
    params = {w.name: w.param for w in weights}
    saved = {name: b.detach().clone() for name, b in gm.named_buffers()}
    sums: dict[tuple[str, int], torch.Tensor] = {}
    batches = 0
    try:
        with torch.no_grad():
            for batches, batch in enumerate(data, 1):
                args = _as_args(batch)
                try:
                    tapped(*args)
                except Exception as err:  # noqa: BLE001 - re-raised naming the batch and the fix
                    shapes = ", ".join(str(tuple(a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)
                    raise ValueError(
                        f"criterion='wanda': calibration batch {batches - 1} (inputs {shapes}) does not fit "
                        f"{type(gm).__name__}: {type(err).__name__}: {err}. Each batch of data= is the model's "
                        "input: a tensor, or a tuple of its positional inputs") from err
                seen = recorder_of(tapped).activations
                for name, fs in uses.items():
                    for i, f in enumerate(fs):
                        add = _squares(seen[key_of[f.x.name]], f, params[name])
                        sums[(name, i)] = add if (name, i) not in sums else sums[(name, i)] + add
                recorder_of(tapped).clear()
    finally:
        with torch.no_grad():
            for name, b in gm.named_buffers():
                if name in saved and b.shape == saved[name].shape:
                    b.copy_(saved[name])
    if batches == 0:
        raise ValueError("criterion='wanda': data= yielded no calibration batch (a generator is used up by its "
                         "first transform: pass a list)")
    out = {}
    for name, fs in uses.items():
        total = functools.reduce(torch.add, [_broadcast(sums[(name, i)], f, params[name]) for i, f in enumerate(fs)])
        out[name] = total.sqrt().to(params[name].device)
    return out


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """|W| * ||X||: `norms` laid out as `weight` (or broadcastable to it), float32."""
    return weight.detach().abs().float() * norms.float()


def row_mask(scores: torch.Tensor, sparsity: float, out_dim: int) -> torch.Tensor:
    """Prune round(sparsity * row length) of the lowest scores within each output row (ties: lowest index first); bool."""
    rows = scores.movedim(out_dim, 0)
    flat = rows.reshape(rows.shape[0], -1)
    k = n_pruned(flat.shape[1], sparsity)
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep.scatter_(1, torch.argsort(flat, dim=1, stable=True)[:, :k], False)  # stable: ties prune the lowest index
    return keep.view(rows.shape).movedim(0, out_dim)


def wanda_out_dim(gm: fx.GraphModule, w: PrunableWeight) -> int:
    """The output-row dimension Wanda compares within (every use of `w` must agree)."""
    dims = {f.out_dim for f in feature_uses(gm, w)}
    if len(dims) != 1:
        raise _refuse(w, "matmul", "read with its rows in different dimensions by different ops")
    return dims.pop()
