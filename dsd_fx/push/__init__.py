"""Grow-Push-Prune's push and the importance it ranks channels by.

objective (PushConfig, push_loss: the deep-LDA objective on a tapped layer, tap_utility), scoring
(importance: the discriminant utility traced back to every channel group).
"""
from __future__ import annotations

from dsd_fx.infra.lazy import reexport

__all__, __getattr__ = reexport(__name__, {
    "objective": ("PushConfig", "push_loss", "push_objective", "tap_push", "tap_utility"),
    "scoring": ("importance", "discriminant_scores", "trace_back"),
})
