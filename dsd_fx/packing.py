"""N:M packing: the kept values plus bit-packed in-group indices. Pure tensor functions."""
from __future__ import annotations

import math

import torch

from dsd_fx.masks import nm_mask, nm_view


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


def pack_nm(weight: torch.Tensor, n: int, m: int, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
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


def unpack_nm(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, dim: int = 1) -> torch.Tensor:
    """The dense weight (pruned entries zero) from pack_nm's (values, meta, dim)."""
    idx = nm_indices(meta, n, m, values.shape)
    groups = values.reshape(-1, n)
    dense = groups.new_zeros(groups.shape[0], m).scatter_(1, idx, groups)
    return dense.view(*values.shape[:-1], values.shape[-1] * m // n).movedim(-1, dim)


def gather_nm(dense_view: torch.Tensor, meta: torch.Tensor, n: int, m: int, values_shape) -> torch.Tensor:
    """The entries of a reduction-last dense tensor at the kept positions: the adjoint of unpack_nm."""
    idx = nm_indices(meta, n, m, values_shape)
    return torch.gather(dense_view.reshape(-1, m), 1, idx).reshape(values_shape)
