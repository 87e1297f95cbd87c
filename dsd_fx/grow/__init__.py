"""Growth (transform(phase="grow")): its options and its plan (widen layers or add Inception branches).

config (GrowConfig), plan (grow_plan). The rewrites are dsd_fx.passes.grow_channels and grow_inception.
"""
from __future__ import annotations

from dsd_fx.infra.lazy import reexport

__all__, __getattr__ = reexport(__name__, {"config": ("GrowConfig",), "plan": ("grow_plan",)})
