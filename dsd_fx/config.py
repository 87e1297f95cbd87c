"""The frozen, validated configuration of a sparse-phase transform."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

Patterns = Union[Sequence[str], Callable[..., bool], None]

SCOPES = ("layer", "global")


def _check_ratio(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where} must be a float in [0, 1), got {value!r} ({type(value).__name__})")
    v = float(value)
    if math.isnan(v) or not 0.0 <= v < 1.0:
        raise ValueError(
            f"{where} must be in [0, 1): the fraction of weights to prune; got {value!r}. "
            "Use e.g. 0.5 to prune half of each layer's weights."
        )
    return v


def _check_patterns(value: Patterns, where: str) -> Patterns:
    if value is None or callable(value):
        return value
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{where} must be a list of name patterns (fnmatch) or a predicate, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class SparseConfig:
    """What the sparse phase prunes, and how much.

    sparsity: fraction of each selected weight to prune, in [0, 1), or a mapping from
        name patterns (fnmatch, matched against the weight's qualified name such as
        ``"encoder.0.fc1.weight"`` or its layer name ``"encoder.0.fc1"``) to fractions; the first
        matching pattern wins and weights matched by none stay dense (add ``"*"`` last for a default).
    include / exclude: name patterns, or a predicate ``fn(weight: PrunableWeight) -> bool``.
    scope: ``"layer"`` (DSD: the same fraction in every layer) or ``"global"`` (rank the
        magnitudes of all selected weights together).
    """

    sparsity: float | Mapping[str, float] = 0.5
    include: Patterns = None
    exclude: Patterns = None
    scope: str = "layer"

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, Mapping):
            if not self.sparsity:
                raise ValueError("sparsity mapping is empty; give at least one 'pattern': fraction entry")
            checked = {}
            for pattern, value in self.sparsity.items():
                if not isinstance(pattern, str):
                    raise TypeError(f"sparsity mapping keys must be name patterns (str), got {pattern!r}")
                checked[pattern] = _check_ratio(value, f"sparsity[{pattern!r}]")
            object.__setattr__(self, "sparsity", dict(checked))
        else:
            object.__setattr__(self, "sparsity", _check_ratio(self.sparsity, "sparsity"))
        object.__setattr__(self, "include", _check_patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _check_patterns(self.exclude, "exclude"))
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.scope == "global" and isinstance(self.sparsity, dict):
            raise ValueError(
                "scope='global' ranks all weights together and takes one sparsity float, "
                f"not a per-layer mapping ({self.sparsity!r}); use scope='layer' for per-layer fractions"
            )
