"""Export to ONNX: a translation, never a rewrite of the training graph."""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
from typing import Any, Iterator

import onnx
import torch
from torch import fx

from dsd_fx.infra.calls import as_args, eval_mode
from dsd_fx.passes.fold_masks import fold_masks
from dsd_fx.tags import has_dsd_nodes

# The exporter's own loggers: torch.onnx logs (through torch's handler) a warning per missing
# optional package on every export; onnxscript and onnx_ir log their optimizer's passes.
EXPORTER_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Raise the exporter's own loggers to ERROR while it runs, where the user has set no level on them.

    Nothing else: stdout, warnings and every other logger are left alone (`verbose=False` already
    stops the exporter's progress prints), so a warning or print from the user's forward still shows.
    """
    quieted = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    quieted = [lg for lg in quieted if lg.level == logging.NOTSET]
    for lg in quieted:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg in quieted:
            lg.setLevel(logging.NOTSET)


def _write_atomically(proto: onnx.ModelProto, path: str | os.PathLike) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".dsd_fx-", suffix=".onnx.part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def export_onnx(
    model: torch.nn.Module,
    example_args: Any,
    path: str | os.PathLike | None = None,
    *,
    optimize: bool = True,
    fold: bool = True,
    opset_version: int | None = None,
    example_kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
) -> onnx.ModelProto:
    """Export `model` (any phase) with the torch.onnx dynamo exporter, in eval mode.

    A sparse-phase graph is first folded: its masks are multiplied into a *copy* of the weights
    (the `fold_masks` pass on a deep copy), so the file has no `Mul` per layer and the training
    graph is untouched. `fold=False` exports the graph as it is. With `path`, the file is written
    atomically (a temporary file renamed into place), so an interrupted export leaves no partial file.
    `example_kwargs` and `dynamic_shapes` go to the exporter as transform's capture takes them
    (torch.export's format); without `dynamic_shapes` the file has the example's static shapes.
    """
    if fold and isinstance(model, fx.GraphModule) and has_dsd_nodes(model.graph):
        model = copy.deepcopy(model)  # the training graph is never rewritten
        fold_masks(model)
    with eval_mode(model), _quiet_exporter():
        program = torch.onnx.export(
            model, as_args(example_args), kwargs=example_kwargs, dynamic_shapes=dynamic_shapes, dynamo=True,
            optimize=optimize, verbose=False, opset_version=opset_version, external_data=False,
        )
    proto = program.model_proto
    if path is not None:
        _write_atomically(proto, path)
    return proto


__all__ = ["export_onnx"]
