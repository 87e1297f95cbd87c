"""Schedules that drive the user's own training loop: DSD (dense, sparse, re-dense) and GPP (grow, push, prune)."""
from __future__ import annotations

from dsd_fx.infra.lazy import reexport

__all__, __getattr__ = reexport(__name__, {"dsd": ("DSD", "PhaseRecord"), "gpp": ("GPP", "GPPRecord", "PruneStep")})
