"""What the frozen option dataclasses share: their option names, and the check of a fraction."""
from __future__ import annotations

import dataclasses
from typing import Any


class Options:
    """A base of the frozen config dataclasses (SparseConfig, PruneConfig, GrowConfig)."""

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The options `transform` takes for this config: its fields."""
        return tuple(f.name for f in dataclasses.fields(cls))


def fraction(value: Any, where: str, *, zero: bool = False, why: str = "") -> float:
    """`value` as a float in (0, 1), or [0, 1) with `zero`; else ValueError naming `where` (and `why`)."""
    low_ok = isinstance(value, (int, float)) and (0 <= value if zero else 0 < value)
    if isinstance(value, bool) or not low_ok or not value < 1:
        raise ValueError(f"{where} must be a fraction in {'[0' if zero else '(0'}, 1){why}, got {value!r}")
    return float(value)
