"""nn.Module -> GraphModule: a fresh graph over the model's own parameter objects."""
from __future__ import annotations

import copy as _copy
import logging
import traceback
import types
from typing import Any

import torch
import torch.nn as nn
from torch import fx
from torch.fx.graph_module import _copy_attr


def _shell(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    """A new module object of the same class holding the *same* parameter and buffer objects.

    Passes register and delete buffers on the shells, so the user's modules never change shape;
    training updates reach the user's model because the tensors are shared.
    """
    if id(module) in memo:
        return memo[id(module)]
    new = module.__class__.__new__(module.__class__)
    memo[id(module)] = new
    state = module.__dict__.copy()  # set through __dict__: nn.Module.__setattr__ is slow
    for bound in ("train", "eval"):  # ep.module() replaces these by methods that raise; the class's own work
        if isinstance(state.get(bound), types.MethodType):
            del state[bound]
    state["_parameters"] = module._parameters.copy()
    state["_buffers"] = module._buffers.copy()
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    state["_modules"] = {k: None if c is None else _shell(c, memo) for k, c in module._modules.items()}
    new.__dict__ = state
    return new


def _graph_module(root: nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """fx.GraphModule(root, graph) without generating its code: the pipeline does that once, at the end."""
    gm = fx.GraphModule(root, fx.Graph(), class_name=class_name)
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            _copy_attr(root, gm, node.target)
    gm.__dict__["_graph"] = graph
    graph.owning_module = gm
    return gm


class _Tracer(fx.Tracer):
    """fx's default tracer that remembers which submodule it was inside when tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.inside: list[str] = []

    def call_module(self, m, forward, args, kwargs):
        self.inside.append(self.path_of_module(m))
        out = super().call_module(m, forward, args, kwargs)
        self.inside.pop()  # not reached if tracing m failed: the path stays
        return out


def _trace(model: nn.Module, concrete_args: dict[str, Any] | None) -> fx.Graph:
    tracer = _Tracer()
    try:
        return tracer.trace(model, concrete_args=concrete_args)
    except Exception as err:  # noqa: BLE001 - re-raised with the remedies
        frames = traceback.extract_tb(err.__traceback__)
        user = [f for f in frames if "/torch/" not in f.filename.replace("\\", "/")]
        where = f" at {user[-1].filename}:{user[-1].lineno} ({user[-1].line})" if user else ""
        inside = [p for p in tracer.inside if p]
        module = (f"submodule '{inside[-1]}' ({type(model.get_submodule(inside[-1])).__name__}) of "
                  if inside else "")
        leaf = f" '{inside[-1]}'" if inside else ""
        raise TypeError(
            f"capture: torch.fx could not trace {module}{type(model).__name__}{where}: {type(err).__name__}: {err}. "
            "Remedies: capture it with torch.export instead (capture=\"export\", example_args=(inputs,)), "
            f"make the failing submodule{leaf} a leaf (a custom fx.Tracer), pass concrete_args "
            "for inputs that steer Python control flow, or pass a GraphModule made by another tracer "
            "(or an ExportedProgram)."
        ) from err


def capture(
    model: nn.Module,
    *,
    copy: bool = False,
    concrete_args: dict[str, Any] | None = None,
    how: str = "auto",
    example_args: Any = None,
    example_kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
) -> fx.GraphModule:
    """Trace `model` (or take the graph of a GraphModule or an ExportedProgram) into a new GraphModule.

    The new GraphModule has its own graph and module objects but shares every parameter and
    buffer with `model`, unless `copy=True`. `model` itself is never modified.

    how="fx": torch.fx.symbolic_trace. how="export": torch.export.export, non-strict, with
    `example_args` / `example_kwargs` and `dynamic_shapes` (default: every dimension of every example
    tensor Dim.AUTO). how="auto": fx, and torch.export where fx fails and `example_args` are given.
    A graph from torch.export (captured here, `ep.module()` or an ExportedProgram) switches
    dropout and batch norm with `train()` / `eval()` (dsd_fx.modes).
    """
    from dsd_fx.infra.export_capture import check_capture_options, export_module, is_exported, prepare_exported

    check_capture_options(how, example_args, example_kwargs, dynamic_shapes)
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, a torch.fx.GraphModule or a torch.export.ExportedProgram, got {type(model).__name__}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        logging.getLogger(__name__).warning(
            "capture: %s is a torch.compile wrapper; transforming its original module (%s). "
            "Compile the GraphModule transform returns instead", type(model).__name__, type(model._orig_mod).__name__)
        model = model._orig_mod
    if copy:
        model = _copy.deepcopy(model)
    exported = None
    if isinstance(model, fx.GraphModule):
        graph = _copy.deepcopy(model.graph)
        class_name = type(model).__name__
    elif how == "export":
        exported = export_module(model, example_args, example_kwargs, dynamic_shapes)
    else:
        try:
            graph = _trace(model, concrete_args)
        except TypeError as fx_err:
            if how == "fx" or example_args is None:
                raise
            logging.getLogger(__name__).info("capture: torch.fx failed on %s; capturing with torch.export", type(model).__name__)
            try:
                exported = export_module(model, example_args, example_kwargs, dynamic_shapes)
            except TypeError as err:  # neither tracer takes it: say what each said
                raise TypeError(f"{err} (capture=\"auto\" tried torch.fx first: {str(fx_err).split('. Remedies')[0]})") from err
        class_name = type(model).__name__
    if exported is not None:  # ep.module(): a GraphModule over the model's own parameter objects
        user_mode = model.training
        mode, class_name = True, type(model).__name__  # captured in train mode (export_capture.export_module)
        model, graph = exported, exported.graph
    root = _shell(model, {})
    gm = _graph_module(root, graph, class_name)
    gm.training = model.training
    if isinstance(model, fx.GraphModule):
        # keep the whole module tree: a module that the graph reaches only through get_attr
        # (a Linear made functional by a pass) must stay a Linear for the pass that restores it
        made = gm._modules  # in the order the graph reads them: the model's order is state_dict's
        gm.__dict__["_modules"] = {**root._modules, **{k: v for k, v in made.items() if k not in root._modules}}
        for name, p in root._parameters.items():
            gm._parameters.setdefault(name, p)
        for name, b in root._buffers.items():
            if name not in gm._buffers:
                gm.register_buffer(name, b, persistent=name not in root._non_persistent_buffers_set)
        gm.meta = dict(getattr(model, "meta", {}))
    if exported is not None or is_exported(gm):
        prepare_exported(gm, mode if exported is not None else None)
    if exported is not None:
        gm.train(user_mode)  # the mode the user's model is in
    return gm
