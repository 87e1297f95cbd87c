"""N:M packing: the kept values plus bit-packed in-group indices, and their forms for torch's 2:4 kernels."""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from dsd_fx.sparse.masks import nm_mask, nm_view


def index_bits(m: int) -> int:
    """Bits per kept value for an in-group index in [0, m): ceil(log2 m)."""
    return max(1, math.ceil(math.log2(m)))


def pack_bits(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat integer tensor with values < 2**bits -> uint8 bitstream, little-endian within each byte."""
    if 8 % bits == 0:  # whole fields per byte: shift and or, in uint8
        per = 8 // bits
        flat = idx.reshape(-1).to(torch.uint8)
        pad = (-flat.numel()) % per
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        fields = flat.view(-1, per)
        out = fields[:, 0].clone()
        for k in range(1, per):
            out |= fields[:, k] << (k * bits)
        return out
    flat = idx.reshape(-1).to(torch.int64)
    shifts = torch.arange(bits, device=flat.device)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = 1 << torch.arange(8, device=flat.device)
    return (stream.view(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of pack_bits: the first `count` values, as int64."""
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        fields = (packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
        return fields.reshape(-1)[:count].to(torch.int64)
    stream = (packed.to(torch.int64).unsqueeze(1) >> torch.arange(8, device=packed.device)) & 1
    stream = stream.reshape(-1)[: count * bits].view(count, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(1)


def pack_tensor(weight: torch.Tensor, n: int, m: int, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, meta): the N kept values of every group of M along `dim`, and their packed indices.

    values has the shape of the reduction-last view with its last size times N/M, for a Linear
    (out, in) that is (out, in*N/M); meta is a uint8 bitstream of ceil(log2 M) bits per value.
    """
    v = nm_view(weight.detach(), dim)
    keep = nm_view(nm_mask(weight, n, m, dim), dim).reshape(-1, m).bool()
    # indices of kept entries, ascending within each group
    idx = torch.sort(torch.where(keep, torch.arange(m, device=v.device), m), dim=1).values[:, :n]
    values = torch.gather(v.reshape(-1, m), 1, idx).reshape(*v.shape[:-1], v.shape[-1] * n // m)
    return values.contiguous(), pack_bits(idx, index_bits(m))


def nm_indices(meta: torch.Tensor, n: int, m: int, values_shape: torch.Size) -> torch.Tensor:
    """The in-group index of every kept value, shaped (groups, N)."""
    count = math.prod(values_shape)
    return unpack_bits(meta, index_bits(m), count).view(-1, n)


def unpack_tensor(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, dim: int = 1) -> torch.Tensor:
    """The dense weight (pruned entries zero) from pack_tensor's (values, meta, dim)."""
    idx = nm_indices(meta, n, m, values.shape)
    groups = values.reshape(-1, n)
    dense = groups.new_zeros(groups.shape[0], m).scatter_(1, idx, groups)
    return dense.view(*values.shape[:-1], values.shape[-1] * m // n).movedim(-1, dim)


def gather_nm(dense_view: torch.Tensor, meta: torch.Tensor, n: int, m: int, values_shape) -> torch.Tensor:
    """The entries of a reduction-last dense tensor at the kept positions: the adjoint of unpack_tensor."""
    idx = nm_indices(meta, n, m, values_shape)
    return torch.gather(dense_view.reshape(-1, m), 1, idx).reshape(values_shape)


def keeps_at_most(dense: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of M along the last dim of `dense` has at most N non-zeros.

    For W.T of a packed W this says whether the mask is transposable: W.T then fits the 2:4
    kernels as well, exactly.
    """
    if dense.shape[-1] % m:
        return False
    return bool((dense.reshape(-1, m) != 0).sum(1).le(n).all())


def cutlass_weight(values: torch.Tensor, meta: torch.Tensor, out_features: int, in_features: int):
    """Our packed 2:4 weight as torch's CUTLASS semi-structured tensor, with no dense round trip.

    CUTLASS keeps, per group of 4, the two kept values in index order (our `values`) and a 4-bit
    code `i0 | i1 << 2` per group, four groups per int16: exactly our little-endian 2-bit index
    stream read as int16. Only CUTLASS's reordering of the metadata words remains to be done.
    CUDA only (the reorder offsets are computed once per shape and device).
    """
    from torch.sparse import SparseSemiStructuredTensorCUTLASS
    from torch.sparse._semi_structured_conversions import _calculate_meta_reordering_scatter_offsets

    ncols = in_features // 16
    key = (out_features, ncols, values.device)
    if key not in _REORDER:
        _REORDER[key] = _calculate_meta_reordering_scatter_offsets(out_features, ncols, torch.int16, values.device)
    words = meta[: out_features * ncols * 2].view(torch.int16)
    reordered = torch.empty_like(words).scatter_(0, _REORDER[key], words).view(out_features, ncols)
    return SparseSemiStructuredTensorCUTLASS(
        torch.Size((out_features, in_features)), packed=values.detach().contiguous(), meta=reordered,
        packed_t=None, meta_t=None, compressed_swizzled_bitmask=None,
    )


_REORDER: dict = {}


# ---------------------------------------------------------------- kernel forms, once per change of the values


class CompressedWeights:
    """A packed weight's kernel form, computed once per change of its values and reused until then.

    The packed values change when the optimizer steps, when load_state_dict copies into them, or
    when the user edits them in place; every one of these bumps the tensor's version counter
    (`tensor._version`). An entry is keyed on the values tensor itself (its identity, held by a
    weak reference so that a dropped model frees its entry) and stamped with the version and the
    storage address of values and meta: `get` recomputes exactly when the stamp differs, and never
    otherwise, so forward and backward of one step (and every micro-batch of an accumulation) share
    one compression. An edit through `.data` bypasses the version counter (`.data` has its own):
    edit the parameter under torch.no_grad() instead. Device-agnostic: `compress` decides what is kept.
    """

    def __init__(self, compress: Callable[[torch.Tensor, torch.Tensor], Any]):
        self._compress = compress
        self._entries: dict[int, tuple] = {}  # id(values) -> (weakref(values), stamp, form)

    @staticmethod
    def _stamp(values: torch.Tensor, meta: torch.Tensor) -> tuple | None:
        try:
            return (values._version, values.data_ptr(), values.dtype, tuple(values.shape),
                    meta._version, meta.data_ptr())
        except RuntimeError:  # inference tensors keep no version counter: never cached
            return None

    def peek(self, values: torch.Tensor, meta: torch.Tensor) -> Any:
        """The cached form for the current values and meta, or None: nothing is computed."""
        entry = self._entries.get(id(values))
        stamp = self._stamp(values, meta)
        if entry is None or stamp is None or entry[0]() is not values or entry[1] != stamp:
            return None
        return entry[2]

    def get(self, values: torch.Tensor, meta: torch.Tensor) -> Any:
        """The form for the current values and meta: cached, or compressed now and cached."""
        form = self.peek(values, meta)
        if form is not None:
            return form
        form = self._compress(values, meta)
        stamp = self._stamp(values, meta)
        if stamp is not None:
            key = id(values)

            def forget(ref, key=key):
                if self._entries.get(key, (None,))[0] is ref:
                    del self._entries[key]

            self._entries[key] = (weakref.ref(values, forget), stamp, form)
        return form

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class SemiStructuredForms:
    """One packed 2:4 weight W (out, in) in torch's semi-structured formats: W for `x @ W.T`, and,
    when W.T is 2:4 along its rows as well (a transposable mask), W.T for the input gradient
    `grad @ W`; otherwise `transposed` is None and that product runs dense, which is exact."""

    weight: Any
    transposed: Any


def compress_semi_structured(values: torch.Tensor, meta: torch.Tensor) -> SemiStructuredForms:
    """CUDA: our packed 2:4 storage in the kernel's format, once per change of the values.

    Compute capability 8.x: CUTLASS, fed our packed values and index bits directly (no dense
    round trip, see packing.cutlass_weight); otherwise cuSPARSELt, compressed from the dense
    weight, rebuilt here and freed. The dense weight also tells whether W.T is 2:4 along its rows.
    """
    from torch.sparse import to_sparse_semi_structured

    out_features, in_features = values.shape[0], values.shape[1] * 2
    dense = unpack_tensor(values.detach(), meta, 2, 4)
    if torch.cuda.get_device_capability(values.device)[0] == 8:  # torch's CUTLASS 2:4 kernels are sm8x-only
        weight = cutlass_weight(values, meta, out_features, in_features)
    else:
        weight = to_sparse_semi_structured(dense)
    transposed = to_sparse_semi_structured(dense.t().contiguous()) if keeps_at_most(dense.t(), 2, 4) else None
    return SemiStructuredForms(weight, transposed)
