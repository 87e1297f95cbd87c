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
def eval_mode(model: torch.nn.Module, no_grad: bool = False, training: bool = False) -> Iterator[torch.nn.Module]:
    """`model` in eval mode (train mode if `training`) for the duration, and without autograd if
    `no_grad` (shapes found while BatchNorm's running stats must not move), every submodule's own
    mode restored after, also when the body raises."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            yield model
    finally:
        for m, was in modes:
            m.training = was


def has_non_finite(t: Any) -> bool:
    """Whether `t` is a floating-point tensor holding NaN or Inf (what the phases refuse to rank or grow)."""
    return isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())
