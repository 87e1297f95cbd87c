"""nn.Module -> GraphModule: a fresh graph over the model's own parameter objects."""
from __future__ import annotations

import copy as _copy
import traceback
from typing import Any

import torch.nn as nn
from torch import fx


def _shell(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    """A new module object of the same class holding the *same* parameter and buffer objects.

    Passes register and delete buffers on the shells, so the user's modules never change shape;
    training updates reach the user's model because the tensors are shared.
    """
    if id(module) in memo:
        return memo[id(module)]
    new = module.__class__.__new__(module.__class__)
    memo[id(module)] = new
    new.__dict__ = module.__dict__.copy()
    new._parameters = module._parameters.copy()
    new._buffers = module._buffers.copy()
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    new._modules = module._modules.copy()
    for name, child in module._modules.items():
        new._modules[name] = None if child is None else _shell(child, memo)
    return new


def _trace(model: nn.Module, concrete_args: dict[str, Any] | None) -> fx.Graph:
    try:
        return fx.Tracer().trace(model, concrete_args=concrete_args)
    except Exception as err:  # noqa: BLE001 - re-raised with the remedies
        frames = traceback.extract_tb(err.__traceback__)
        user = [f for f in frames if "/torch/" not in f.filename.replace("\\", "/")]
        where = f" at {user[-1].filename}:{user[-1].lineno} ({user[-1].line})" if user else ""
        raise TypeError(
            f"capture: torch.fx could not trace {type(model).__name__}{where}: {type(err).__name__}: {err}. "
            "Remedies: make the failing submodule a leaf (a custom fx.Tracer), pass concrete_args "
            "for inputs that steer Python control flow, or pass a GraphModule made by another tracer "
            "(for example transformers.utils.fx.symbolic_trace)."
        ) from err


def capture(model: nn.Module, *, copy: bool = False, concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """Trace `model` (or take the graph of a GraphModule) into a new GraphModule.

    The new GraphModule has its own graph and module objects but shares every parameter and
    buffer with `model`, unless `copy=True`. `model` itself is never modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module or a torch.fx.GraphModule, got {type(model).__name__}")
    if copy:
        model = _copy.deepcopy(model)
    if isinstance(model, fx.GraphModule):
        graph = _copy.deepcopy(model.graph)
        class_name = type(model).__name__
    else:
        graph = _trace(model, concrete_args)
        class_name = type(model).__name__
    root = _shell(model, {})
    gm = fx.GraphModule(root, graph, class_name=class_name)
    gm.training = model.training
    if isinstance(model, fx.GraphModule):
        # keep the whole module tree: a module that the graph reaches only through get_attr
        # (a Linear made functional by a pass) must stay a Linear for the pass that restores it
        for name, child in root._modules.items():
            gm._modules[name] = child
        for name, p in root._parameters.items():
            gm._parameters.setdefault(name, p)
        for name, b in root._buffers.items():
            if name not in gm._buffers:
                gm.register_buffer(name, b, persistent=name not in root._non_persistent_buffers_set)
        gm.meta = dict(getattr(model, "meta", {}))
    return gm
