"""The options of transform(phase="prune"), validated once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from dsd_fx.infra.options import Options, fraction
from dsd_fx.sparse.config import SCOPES

IMPORTANCES = ("l1", "l2", "discriminant")


def _fraction(value: Any, where: str) -> float:
    return fraction(value, f"prune: {where}", zero=True, why=" (a share of each group's channels; 1 would remove all of them)")


def _patterns(value: Any, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    value = (value,) if isinstance(value, str) else tuple(value)
    if not value or not all(isinstance(p, str) for p in value):
        raise TypeError(f"prune: {name} must be a layer-name pattern or a list of them (like 'encoder.*.mlp.0'), got {value!r}")
    return value


@dataclass(frozen=True)
class PruneConfig(Options):
    """channels: a fraction in [0, 1) of every prunable group (floor(fraction * size) removed,
        never all), or {layer pattern: fraction}: a group takes the first pattern that matches one
        of its producing layers; groups no pattern matches stay whole.
    importance: "l1", "l2", "discriminant" or a callable (group, example_args) -> scores of shape
        (group.size,): the lowest-scoring channels go. "discriminant": dsd_fx.push.scoring's class
        separation at the final classifier's input, traced back through the weights (needs `data`).
    data: for importance="discriminant" only: an iterable of (inputs, labels) batches (a DataLoader).
    example_args: an example input (a tensor or a tuple), to propagate shapes.
    round_to: keep each pruned group's size a multiple of this (rounding the kept count up).
    scope: "layer" (each group its fraction) or "global" (one ranking of mean |w| per channel
        over all groups, floor(fraction * all channels) removed in all).
    include / exclude: layer-name patterns of producing layers whose groups may / may not lose channels.
    inplace: write the smaller layers into the user's own modules too.
    """

    channels: float | Mapping[str, float] = 0.25
    importance: str | Callable = "l1"
    example_args: Any = None
    round_to: int | None = None
    scope: str = "layer"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    inplace: bool = False
    data: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.channels, Mapping):
            if not self.channels:
                raise ValueError("prune: channels={} names no layer; give a fraction or {'pattern': fraction}")
            rates = {}
            for pattern, value in self.channels.items():
                if not isinstance(pattern, str):
                    raise TypeError(f"prune: channels keys must be layer-name patterns (str), got {pattern!r}")
                rates[pattern] = _fraction(value, f"channels[{pattern!r}]")
            object.__setattr__(self, "channels", rates)
        else:
            object.__setattr__(self, "channels", _fraction(self.channels, "channels"))
        if not callable(self.importance) and self.importance not in IMPORTANCES:
            raise ValueError(f"prune: importance must be one of {IMPORTANCES} or a callable (group, example_args) -> scores, got {self.importance!r}")
        self._check_data()
        if self.round_to is not None and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1):
            raise ValueError(f"prune: round_to must be a positive int (like 8) or None, got {self.round_to!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"prune: scope must be one of {SCOPES}, got {self.scope!r}")
        if self.scope == "global" and isinstance(self.channels, dict):
            raise ValueError("prune: scope='global' ranks all groups with one fraction; give channels as a number, not a mapping")
        object.__setattr__(self, "include", _patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _patterns(self.exclude, "exclude"))
        if self.example_args is None:
            raise TypeError("transform(phase='prune') needs example_args=(x,): an example input, to propagate "
                            "shapes through the graph and find which channels are tied")
        if not isinstance(self.example_args, tuple):
            object.__setattr__(self, "example_args", (self.example_args,))
        if not isinstance(self.inplace, bool):
            raise TypeError(f"prune: inplace must be True or False, got {self.inplace!r}")

    def _check_data(self) -> None:
        if self.importance == "discriminant" and self.data is None:
            raise TypeError("prune: importance='discriminant' needs data=: an iterable of (inputs, labels) batches "
                            "(a DataLoader will do), to measure how well each unit separates the classes")
        if self.importance != "discriminant" and self.data is not None:
            raise TypeError(f"prune: data= is used only by importance='discriminant', but importance={self.importance!r}; "
                            "drop data= or set importance='discriminant'")
        if self.data is not None and (isinstance(self.data, (str, bytes, dict)) or not hasattr(self.data, "__iter__")):
            raise TypeError(f"prune: data must be an iterable of (inputs, labels) batches (a DataLoader or a list of "
                            f"(x, y) pairs), got a {type(self.data).__name__}")

