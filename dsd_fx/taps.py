"""The push tap: a graph node that records a layer's activations for the push loss and returns them unchanged."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx

from dsd_fx.tags import Role

TAP_ROLE = Role.TAP  # the tap call: tap(recorder, x, name) -> x
RECORDER_ROLE = Role.TAP_RECORDER  # the get_attr of the recorder the taps write to
RECORDER = "_dsd_fx_taps"  # attribute name of the recorder on the GraphModule


class TapRecorder(torch.nn.Module):
    """Holds, per tap name, the activations of the last batch that went through the graph.

    The tensors are kept as they came (autograd history included), so the push loss back-propagates
    through them into the network. It has no parameters or buffers: `state_dict` and
    `named_parameters` of a tapped graph equal those of the untapped one. Copies and pickles
    (`copy.deepcopy`, `torch.save`) drop the recorded batch, which is transient.
    """

    def __init__(self, names: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.names = tuple(names)
        self.activations: dict[str, torch.Tensor] = {}

    def forward(self, *args: Any) -> None:  # pragma: no cover - the graph calls `tap`, never the module
        raise TypeError("TapRecorder is read by dsd_fx.taps.tap nodes; it is not called as a layer")

    def clear(self) -> None:
        """Drop the recorded batch (and the autograd graph it keeps alive)."""
        self.activations.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["activations"] = {}
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> TapRecorder:
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__ = copy.deepcopy(self.__getstate__(), memo)
        return new


def tap(recorder: TapRecorder, x: torch.Tensor, name: str) -> torch.Tensor:
    """Record `x` under `name` on `recorder` and return `x` itself (the same tensor object).

    Eager: one dict store. An fx tracer (torch.load of a GraphModule re-traces its code) records one
    node. torch.compile inlines it: the store is a side effect that dynamo replays after the compiled
    graph, with `x` as an extra graph output, so there is no graph break (tested: torch._dynamo.explain
    finds one graph and no break; fullgraph=True with the aot_eager backend compiles) and gradients flow
    through the recorded tensor. It is not a torch.library custom op on purpose: such an op may not
    return its input (outputs must not alias inputs), and a copy would break "the same tensor". torch.export (and the ONNX exporter built on it) sees the identity and records
    nothing: an exported graph has no tap in it.
    """
    if isinstance(x, fx.Proxy):
        # named as insert_taps names it, so that tags kept for torch.load find the node again
        return x.tracer.create_proxy("call_function", tap, (recorder, x, name), {}, name=f"{name}_tap")
    if torch.compiler.is_exporting():
        return x
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"tap {name!r}: the tapped value is a {type(x).__name__}, not a tensor; tap the node that "
            "picks the tensor out of it (a getitem node) instead"
        )
    recorder.activations[name] = x
    return x


def recorder_of(gm: torch.nn.Module) -> TapRecorder | None:
    """The recorder a tapped GraphModule writes to, or None for an untapped one."""
    rec = getattr(gm, RECORDER, None)
    return rec if isinstance(rec, TapRecorder) else None
