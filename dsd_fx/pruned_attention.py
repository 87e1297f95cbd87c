"""nn.MultiheadAttention with fewer heads than embed_dim // head_dim: what pruning its heads leaves."""
from __future__ import annotations

import math

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
        # the op sequence of nn.MultiheadAttention's (F.multi_head_attention_forward), so that the
        # pruned graph exports to the same ONNX ops, with num_heads * head_dim for embed_dim
        batched = query.dim() == 3
        if self.batch_first and batched:
            if key is value and query is key:
                query = key = value = query.transpose(1, 0)
            elif key is value:
                query, key = query.transpose(1, 0), key.transpose(1, 0)
                value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = self._attend(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                                    is_causal, batched)
        return (out.transpose(1, 0) if self.batch_first and batched else out), weights

    def _attend(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal,
                batched):
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        tgt_len, bsz, _ = query.shape
        src_len = key.shape[0]
        h, d = self.num_heads, self.head_dim
        inner = h * d
        key_padding_mask = _float_mask(key_padding_mask, query.dtype)
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = _float_mask(attn_mask, query.dtype)
            is_causal = False if key_padding_mask is not None else is_causal
        q, k, v = self._in_projection(query, key, value, inner)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        q = q.view(tgt_len, bsz * h, d).transpose(0, 1)
        k = k.view(k.shape[0], bsz * h, d).transpose(0, 1)
        v = v.view(v.shape[0], bsz * h, d).transpose(0, 1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, h, -1, -1).reshape(bsz * h, 1, src_len)
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(d))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, inner)
            out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
            out = out.view(tgt_len, bsz, out.size(1))
            weights = weights.view(bsz, h, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            return (out.squeeze(1), weights.squeeze(0)) if not batched else (out, weights)
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, h, -1, src_len)
        q, k, v = q.view(bsz, h, tgt_len, d), k.view(bsz, h, src_len, d), v.view(bsz, h, src_len, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, inner)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        out = out.view(tgt_len, bsz, out.size(1))
        return (out.squeeze(1) if not batched else out), None

    def _in_projection(self, query, key, value, inner: int):
        w, b = self.in_proj_weight, self.in_proj_bias
        if key is value and query is key:  # self-attention: one packed matmul
            proj = F.linear(query, w, b)
            proj = proj.unflatten(-1, (3, inner)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return proj[0], proj[1], proj[2]
        bs = b.chunk(3) if b is not None else (None, None, None)
        return tuple(F.linear(x, wi, bi) for x, wi, bi in zip((query, key, value), w.chunk(3), bs))


def _float_mask(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """A boolean mask (True: may not attend) as an additive float mask, as nn.MultiheadAttention does."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
