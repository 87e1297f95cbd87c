"""SAD, Sparse Architecture Divergence (SR-STE paper): how many weights changed kept/pruned state."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from dsd_fx.masks import nm_mask
from dsd_fx.packing import unpack_nm
from dsd_fx.passes.pack_nm import PACKED_ATTR
from dsd_fx.tags import tagged


def current_masks(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The boolean keep-mask of every sparse weight of a sparse-phase graph, as it is now.

    Fixed masks are read from their buffers, SR-STE masks recomputed from the current weights,
    packed masks read from the index metadata.
    """
    out: dict[str, torch.Tensor] = {}
    for node in tagged(gm.graph, role="masked"):
        name = node.args[0].target
        if name in out:
            continue
        if isinstance(node.args[1], fx.Node):
            out[name] = gm.get_buffer(node.args[1].target).detach().ne(0)
        else:
            _, n, m, dim, _ = node.args
            out[name] = nm_mask(gm.get_parameter(name), n, m, dim).ne(0)
    for prefix, module in gm.named_modules():
        for attr, info in module.__dict__.get(PACKED_ATTR, {}).items():
            values, meta = module.get_parameter(f"{attr}_values"), module.get_buffer(f"{attr}_meta")
            ones = torch.ones_like(values, dtype=torch.float32)
            keep = unpack_nm(ones, meta, info["n"], info["m"], info["dim"]).reshape(info["shape"]).ne(0)
            out[f"{prefix}.{attr}" if prefix else attr] = keep
    return out


@dataclass
class SAD:
    """Per layer (changed, total) and the totals; `fraction` = changed / total."""

    per_layer: dict[str, tuple[int, int]]
    changed: int
    total: int

    @property
    def fraction(self) -> float:
        return self.changed / self.total if self.total else 0.0

    def __str__(self) -> str:
        rows = [f"{name}: {c} of {t} ({c / t:.4%})" for name, (c, t) in self.per_layer.items()]
        return "\n".join(rows + [f"total: {self.changed} of {self.total} ({self.fraction:.4%})"])


def sad(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> SAD:
    """SAD between two mask snapshots: the L1 distance of the binary masks, per layer and in total."""
    if set(before) != set(after):
        raise ValueError(f"the snapshots cover different weights: {sorted(set(before) ^ set(after))}")
    per = {}
    for name in before:
        a, b = before[name].bool(), after[name].bool()
        if a.shape != b.shape:
            raise ValueError(f"mask of '{name}' has shape {tuple(a.shape)} in one snapshot, {tuple(b.shape)} in the other")
        per[name] = (int((a ^ b).sum()), a.numel())
    return SAD(per, sum(c for c, _ in per.values()), sum(t for _, t in per.values()))


@dataclass
class SADTracker:
    """Record SAD every `every` steps of a user's loop: call `step()` once per training step.

    `history` holds (step, SAD since the previous record, SAD since the start).
    """

    gm: fx.GraphModule
    every: int = 1
    history: list[tuple[int, SAD, SAD]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        self._steps = 0
        self._start = {k: v.clone() for k, v in current_masks(self.gm).items()}
        if not self._start:
            raise ValueError("SADTracker needs a sparse-phase graph (transform(model, phase='sparse', ...))")
        self._last = self._start

    def step(self) -> SAD | None:
        self._steps += 1
        if self._steps % self.every:
            return None
        now = {k: v.clone() for k, v in current_masks(self.gm).items()}
        since_last = sad(self._last, now)
        self.history.append((self._steps, since_last, sad(self._start, now)))
        self._last = now
        return since_last
