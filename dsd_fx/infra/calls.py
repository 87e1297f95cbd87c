"""How dsd_fx runs a user's model: in eval mode, on example args given as a tuple or one tensor."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


def as_args(example_args: Any, needed_by: str | None = None) -> tuple:
    """The example inputs as the positional-argument tuple a call takes; `needed_by` (what needs
    them, for the message) refuses None."""
    if example_args is None and needed_by is not None:
        raise TypeError(f"{needed_by} needs example_args=(x,): one example input, to propagate shapes")
    return example_args if isinstance(example_args, tuple) else (example_args,)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module, no_grad: bool = False) -> Iterator[torch.nn.Module]:
    """`model` in eval mode for the duration (and without autograd if `no_grad`: shapes found while
    BatchNorm's running stats must not move), every submodule's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            yield model
    finally:
        for m, was in modes:
            m.training = was
