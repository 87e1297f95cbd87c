"""SAD, Sparse Architecture Divergence (SR-STE paper): how many weights changed kept/pruned state."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from dsd_fx.state import current_masks


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
