"""Structural pruning (transform(phase="prune")): its options and its plan (groups, scores, choice, commit).

config (PruneConfig), plan (prune_plan). The rewrite itself is dsd_fx.passes.prune_channels.
"""
from __future__ import annotations

from dsd_fx.infra.lazy import reexport

__all__, __getattr__ = reexport(__name__, {"config": ("PruneConfig",), "plan": ("prune_plan", "score", "choose")})
