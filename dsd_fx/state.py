"""The one record of a sparse-phase graph: its options, its masks and its tags, read by `masks_of`."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import fx

from dsd_fx.sparse.masks import nm_mask
from dsd_fx.sparse.packing import unpack_tensor

STATE = "_dsd_fx"  # the submodule of a sparse-phase graph holding its record


class MaskKind(str, Enum):
    BUFFER = "buffer"  # a `<weight>_mask` buffer, fixed for the phase (magnitude, fixed N:M)
    DYNAMIC = "dynamic"  # recomputed from the weight at every forward (SR-STE, STE)
    PACKED = "packed"  # the weight is stored as `<weight>_values` + `<weight>_meta`


@dataclass
class MaskRecord:
    """How one weight is sparse. `weight` is its qualified name; `buffer` the mask's (BUFFER);
    `n`, `m`, `dim`, `lambda_w` the N:M pattern along the reduction dim; for PACKED, `param` is
    the user's original Parameter (emptied; re-dense refills this same object under its name),
    `shape` its dense shape and `order` its module's parameter order (that of state_dict keys)."""

    weight: str
    kind: MaskKind
    buffer: str | None = None
    n: int | None = None
    m: int | None = None
    dim: int | None = None
    lambda_w: float = 0.0
    param: torch.nn.Parameter | None = field(default=None, repr=False)
    shape: tuple[int, ...] | None = None
    order: tuple[str, ...] = ()

    @property
    def values(self) -> str:
        return f"{self.weight}_values"

    @property
    def meta(self) -> str:
        return f"{self.weight}_meta"


class TransformState(torch.nn.Module):
    """The record on a sparse-phase GraphModule (`gm._dsd_fx`), kept through deepcopy and
    torch.save/torch.load: the options it was made with, one MaskRecord per sparse weight, and
    the nodes' tags by name. Its state_dict entry `_dsd_fx._extra_state` holds the options (JSON
    bytes in a uint8 tensor, so the state_dict stays all tensors, safetensors included): loading a
    checkpoint made with other options raises, naming them."""

    def __init__(self, options: dict, masks: list[MaskRecord]) -> None:
        super().__init__()
        self.options = json.loads(json.dumps(options))  # as it will read back
        self.masks = {r.weight: r for r in masks}
        self.tags: dict[str, tuple] = {}

    def get_extra_state(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(json.dumps(self.options, sort_keys=True).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        state = json.loads(bytes(state.cpu().tolist()).decode()) if isinstance(state, torch.Tensor) else state
        if state == self.options:
            return
        keys = [k for k in {**state, **self.options} if state.get(k) != self.options.get(k)]
        diffs = "; ".join(f"{k}: checkpoint {state.get(k)!r}, this model {self.options.get(k)!r}" for k in keys)
        raise ValueError(
            f"load_state_dict: this checkpoint comes from a sparse-phase model made with other options ({diffs}). "
            "Transform a fresh model with the checkpoint's options, then load it"
        )


def state_of(gm: torch.nn.Module) -> TransformState | None:
    record = getattr(gm, "_modules", {}).get(STATE)
    return record if isinstance(record, TransformState) else None


def masks_of(gm: torch.nn.Module) -> list[MaskRecord]:
    """The MaskRecord of every sparse weight of a sparse-phase graph (empty for any other model)."""
    record = state_of(gm)
    return list(record.masks.values()) if record is not None else []


def keep_mask(gm: fx.GraphModule, r: MaskRecord) -> torch.Tensor:
    """The boolean keep-mask of one sparse weight as it is now: a fixed mask from its buffer, an
    SR-STE mask recomputed from the current weight, a packed mask from the index metadata."""
    if r.kind is MaskKind.BUFFER:
        return gm.get_buffer(r.buffer).detach().ne(0)
    if r.kind is MaskKind.DYNAMIC:
        return nm_mask(gm.get_parameter(r.weight).detach(), r.n, r.m, r.dim).ne(0)
    ones = torch.ones_like(gm.get_parameter(r.values), dtype=torch.float32)
    return unpack_tensor(ones, gm.get_buffer(r.meta), r.n, r.m, r.dim).reshape(r.shape).ne(0)


def current_masks(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The boolean keep-mask of every sparse weight of a sparse-phase graph, as it is now."""
    return {r.weight: keep_mask(gm, r) for r in masks_of(gm)}


@dataclass(frozen=True)
class Refill:
    """What re-dense writes into one Parameter, from tensors held before the passes drop them:
    W * M in place (mask a buffer, or None for an SR-STE mask recomputed from W), or the unpacked
    values of a packed weight into the emptied Parameter. Computed one weight at a time."""

    record: MaskRecord
    param: torch.nn.Parameter
    mask: torch.Tensor | None = None
    values: torch.Tensor | None = None
    meta: torch.Tensor | None = None

    def commit(self) -> None:
        r = self.record
        with torch.no_grad():
            if r.kind is MaskKind.PACKED:  # the same Parameter object, refilled
                self.param.data = unpack_tensor(self.values.detach(), self.meta, r.n, r.m, r.dim).reshape(r.shape).contiguous()
            elif r.kind is MaskKind.BUFFER:
                self.param.mul_(self.mask.to(self.param.dtype))
            else:
                self.param.mul_(nm_mask(self.param, r.n, r.m, r.dim))


def refills(gm: fx.GraphModule) -> list[Refill]:
    """One Refill per sparse Parameter (a tied weight once), holding references, not copies."""
    out, seen = [], set()
    for r in masks_of(gm):
        if r.kind is MaskKind.PACKED:
            out.append(Refill(r, r.param, values=gm.get_parameter(r.values), meta=gm.get_buffer(r.meta)))
            continue
        param = gm.get_parameter(r.weight)
        if id(param) not in seen:
            seen.add(id(param))
            out.append(Refill(r, param, mask=gm.get_buffer(r.buffer) if r.kind is MaskKind.BUFFER else None))
    return out
