"""nn.MultiheadAttention with fewer heads than embed_dim // head_dim: what pruning its heads leaves."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """Self- or cross-attention with `num_heads` heads of `head_dim` channels read from and
    written to an `embed_dim`-wide stream, where num_heads * head_dim may be less than embed_dim.

    nn.MultiheadAttention ties its projections' width to embed_dim, so a pruned one cannot run;
    this class keeps the same parameters under the same names (in_proj_weight (3 * num_heads *
    head_dim, embed_dim), in_proj_bias, out_proj) and computes what nn.MultiheadAttention does
    with those heads. The prune pass gives a pruned layer this class (in the returned GraphModule
    only: inplace=True is refused for it). Packed in_proj_weight only; no bias_k / bias_v, no
    add_zero_attn (dsd_fx does not prune those)."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, source = query.shape[0], query.shape[1], key.shape[1]
        h, d = self.num_heads, self.head_dim
        w = self.in_proj_weight.chunk(3)
        b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = (F.linear(x, wi, bi).view(n, x.shape[1], h, d).transpose(1, 2) for x, wi, bi in zip((query, key, value), w, b))
        mask = self._mask(attn_mask, key_padding_mask, q.dtype, n, length, source)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) * d ** -0.5
            if mask is not None:
                scores = scores + mask
            weights = F.softmax(scores, dim=-1)
            out = F.dropout(weights, dropout) @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out, weights = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal and mask is None), None
        out = F.linear(out.transpose(1, 2).reshape(n, length, h * d), self.out_proj.weight, self.out_proj.bias)
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _mask(self, attn_mask, key_padding_mask, dtype, n: int, length: int, source: int) -> torch.Tensor | None:
        """One additive float mask of shape broadcastable to (n, heads, length, source)."""
        mask = None
        for m, shape in ((attn_mask, None), (key_padding_mask, (n, 1, 1, source))):
            if m is None:
                continue
            if m.dtype == torch.bool:  # True: may not attend (nn.MultiheadAttention's convention)
                m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
            if shape is not None:
                m = m.reshape(shape)
            elif m.dim() == 3:  # (n * heads, length, source)
                m = m.view(n, self.num_heads, length, source)
            mask = m if mask is None else mask + m
        return mask
