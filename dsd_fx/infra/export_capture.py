"""Capture through torch.export (non-strict): the options, the export, and what exported graphs carry."""
from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, Iterator

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from dsd_fx.infra.calls import as_args, eval_mode
from dsd_fx.modes import captured_mode, make_switchable

CAPTURES = ("auto", "fx", "export")
GUARDS = "_guards_fn"  # ep.module()'s input-guard submodule
# nodes that only assert what export saw (dtype, device, layout of an operand of .to()): they pin a
# graph to the capture's device and compute nothing, so a captured graph drops them
_ASSERTS = (torch.ops.aten._assert_tensor_metadata.default,)


def check_capture_options(how: str, example_args: Any, example_kwargs: Any, dynamic_shapes: Any) -> None:
    """The capture options, checked before anything runs."""
    if how not in CAPTURES:
        raise ValueError(f"capture={how!r} is not a capture mode; use capture=\"auto\" (torch.fx, then torch.export "
                         "where fx fails and example_args are given), \"fx\" or \"export\"")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs must be a dict of keyword arguments, got {type(example_kwargs).__name__}")
    if dynamic_shapes is not None and example_args is None and example_kwargs is None:
        raise ValueError("dynamic_shapes= describes the example inputs: pass example_args=(inputs,) with it")


def default_dynamic_shapes(args: tuple, kwargs: dict) -> tuple:
    """Dim.AUTO for every dimension of every example tensor: a graph captured at one batch size and
    length runs at others (torch.export specialises what the model fixes, and sizes 0 and 1)."""
    def spec(x: Any) -> Any:
        return {i: torch.export.Dim.AUTO for i in range(x.dim())} if isinstance(x, torch.Tensor) else None

    return tuple(pytree.tree_map(spec, a) for a in (*args, *kwargs.values()))


@contextlib.contextmanager
def _quiet_specialisation(quiet: bool) -> Iterator[None]:
    """Dim.AUTO on a dimension of size 1 makes export warn that it specialised it; with the default
    dynamic shapes that is expected, not news."""
    logger = logging.getLogger("torch._export.non_strict_utils")
    old = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def export_module(model: nn.Module, example_args: Any, example_kwargs: dict | None, dynamic_shapes: Any) -> fx.GraphModule:
    """`torch.export.export(model, ..., strict=False).module()`: the model's own parameter objects
    under their own names. Raises TypeError naming the fix where export fails."""
    name = type(model).__name__
    if example_args is None and example_kwargs is None:
        raise ValueError(f"capture=\"export\" of {name} needs example inputs: pass example_args=(inputs,) "
                         "(and example_kwargs={...} for keyword inputs), as the model's forward takes them")
    args = () if example_args is None else as_args(example_args)
    kwargs = dict(example_kwargs or {})
    if dynamic_shapes is None:
        _refuse_var_keyword(model, kwargs)
    shapes = default_dynamic_shapes(args, kwargs) if dynamic_shapes is None else dynamic_shapes
    try:
        # export in train mode (every submodule's flag restored after): torch.export bakes the mode in, and a
        # train-mode value the model picks in Python (`dropout_p=p if self.training else 0.0`) exists only in
        # a train-mode capture; dsd_fx.modes then switches the graph. Non-strict export runs on fake tensors.
        with _quiet_specialisation(dynamic_shapes is None), eval_mode(model, training=True):
            program = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as err:  # noqa: BLE001 - re-raised with the remedies
        text = str(err).strip().splitlines()
        detail = " ".join(text[:6])[:1200] if text else ""
        given = ", ".join(f"{type(a).__name__}{tuple(a.shape) if isinstance(a, torch.Tensor) else ''}" for a in args)
        raise TypeError(
            f"capture: torch.export could not capture {name} with example_args ({given})"
            f"{' and example_kwargs ' + ', '.join(kwargs) if kwargs else ''}: {type(err).__name__}: {detail}. "
            "Remedies: check that the model runs on these inputs (model(*example_args, **example_kwargs)); "
            "where a dimension must stay fixed or the message names a conflict, pass dynamic_shapes= "
            "(torch.export's format, e.g. ({0: Dim.AUTO},) or None for a fixed input); "
            "or capture with torch.fx (capture=\"fx\")."
        ) from err
    return program.module(check_guards=False)


def _refuse_var_keyword(model: nn.Module, kwargs: dict) -> None:
    """A keyword input that reaches forward through **kwargs: torch.export (2.13) takes no dynamic
    dims for it, so the default dynamic shapes cannot describe it; said before anything runs."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)
    loose = [k for k in kwargs if k not in named]
    if var is not None and loose:
        raise ValueError(
            f"capture=\"export\": example_kwargs '{loose[0]}' reaches {type(model).__name__}.forward through **{var}, "
            "where torch.export cannot make its dims dynamic; give forward a named parameter for it "
            f"(def forward(self, ..., {loose[0]}=None)), or pass dynamic_shapes= for every input (torch.export's format)")


def is_exported(gm: fx.GraphModule) -> bool:
    """Whether `gm`'s graph comes from torch.export (aten ops, its guards, or its mode ops)."""
    if GUARDS in gm._modules:
        return True
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "aten"
               for n in gm.graph.nodes)


def prepare_exported(gm: fx.GraphModule, mode: bool | None) -> None:
    """Make a graph from torch.export behave as a module: drop its input guards and metadata
    asserts, and make dropout and batch norm follow `gm.train()` / `gm.eval()`.

    `mode`: the mode the model was captured in (None: read it from the graph's ops).
    """
    g = gm.graph
    for node in list(g.nodes):
        # ep.module() reads every parameter once up front, a tied one under each of its names even
        # where the graph uses one: a read nothing uses is dropped
        if ((node.op == "call_module" and node.target == GUARDS) or (node.op == "call_function" and node.target in _ASSERTS)
                or node.op == "get_attr") and not node.users:
            g.erase_node(node)
    if GUARDS in gm._modules and not any(n.op == "call_module" and n.target == GUARDS for n in g.nodes):
        del gm._modules[GUARDS]
    if mode is None:
        mode = captured_mode(g)
    if mode is not None:
        make_switchable(gm, mode)
        gm.train(mode)
