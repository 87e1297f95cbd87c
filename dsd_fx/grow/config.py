"""The options of transform(phase="grow"), validated once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsd_fx.infra.options import Options

HOWS = ("zeros", "net2net", "inception")


def _layers(value: Any) -> tuple[str, ...]:
    value = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else value
    if not isinstance(value, tuple) or not value or not all(isinstance(v, str) and v for v in value):
        raise TypeError(f"grow: at must be a layer name or a list of them (like ['conv1', 'fc1']), got {value!r}")
    return tuple(dict.fromkeys(value))


def _width(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"grow: width must be a positive int (channels added per group) or a positive fraction "
                         f"of each group's size (like 0.5), got {value!r}")
    return value


@dataclass(frozen=True)
class GrowConfig(Options):
    """at: the layers whose output channel group grows (the group's producers, as channel_groups names them).
    width: channels added to each such group: an int, or a float (a fraction of the group's size,
        rounded up: ceil(width * size)).
    how: "zeros" (new producer channels drawn like the layer's own init, norms identity, consumers
        zero input columns), "net2net" (the `width` channels of largest L1 duplicated, consumers'
        columns split in half between original and copy) or "inception" (each layer, a convolution,
        becomes one branch of an Inception module: 1x1 | 1x1->3x3 | 1x1->3x3->3x3 | pool->1x1
        branches beside it share the `width` new channels, concatenated after its own; norms
        identity, consumers zero input columns).
    example_args: an example input (a tensor or a tuple), to propagate shapes and check that the
        grown graph computes what the original does.
    inplace: write the wider layers into the user's own modules too (not with how="inception":
        its new layers are calls the model's own forward does not make).
    seed: the seed of the new channels' random init (how="zeros"; the branches of how="inception").
    """

    at: Any = None
    width: int | float = 0.25
    how: str = "zeros"
    example_args: Any = None
    inplace: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "at", _layers(self.at))
        object.__setattr__(self, "width", _width(self.width))
        if self.how not in HOWS:
            raise ValueError(f"grow: how must be one of {HOWS}, got {self.how!r}")
        if self.example_args is None:
            raise TypeError("transform(phase='grow') needs example_args=(x,): an example input, to propagate shapes "
                            "through the graph, find which channels are tied and check the grown graph's outputs")
        if not isinstance(self.example_args, tuple):
            object.__setattr__(self, "example_args", (self.example_args,))
        if not isinstance(self.inplace, bool):
            raise TypeError(f"grow: inplace must be True or False, got {self.inplace!r}")
        if self.inplace and self.how == "inception":
            raise ValueError("grow: how='inception' adds layers that the model's own forward does not call, so it "
                             "cannot be written into the model: leave inplace=False and use the GraphModule transform returns")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"grow: seed must be an int, got {self.seed!r}")

