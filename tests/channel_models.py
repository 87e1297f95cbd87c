"""Small models with each coupled-channel structure, for the channel and prune tests."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResBlock(nn.Module):
    """ResNet-style: BN after every conv, a residual add with a strided 1x1 downsample branch."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.down, self.bd = nn.Conv2d(8, 16, 1, stride=2), nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        z = self.dw(F.relu(y + self.bd(self.down(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 4), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2-style: expand 1x1, depthwise 3x3, project 1x1, residual add around them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.expand, self.bn1 = nn.Conv2d(8, 24, 1, bias=False), nn.BatchNorm2d(24)
        self.dw, self.bn2 = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False), nn.BatchNorm2d(24)
        self.project, self.bn3 = nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 5)

    def forward(self, x):
        s = F.relu6(self.bn0(self.stem(x)))
        h = F.relu6(self.bn2(self.dw(F.relu6(self.bn1(self.expand(s))))))
        s = s + self.bn3(self.project(h))
        return self.head(self.pool(s).flatten(1))


class Inception(nn.Module):
    """Two branches concatenated along channels, a BatchNorm after the concat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 4, 1)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.mix = nn.Conv2d(10, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        s = F.relu(self.stem(x))
        y = F.relu(self.bn(torch.cat([self.a(s), self.b(s)], dim=1)))
        return self.fc(self.mix(y).mean((2, 3)))


class Dense(nn.Module):
    """DenseNet-style: every layer's output concatenated onto everything before it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 4, 3, padding=1)
        self.c2 = nn.Conv2d(12, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        s = self.stem(x)
        z1 = torch.cat([s, self.c1(F.relu(s))], 1)
        z2 = torch.cat([z1, self.c2(F.relu(z1))], 1)
        return self.fc(self.head(F.relu(self.bn(z2))).mean((2, 3)))


class MLPBlock(nn.Module):
    """A transformer block's MLP: LayerNorm, Linear up, GELU, Linear down, residual."""

    def __init__(self, dim: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):  # (B, T, dim)
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


class FlatCNN(nn.Module):
    """The last conv flattened into a Linear: each channel a block of H*W features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 10)

    def forward(self, x):  # (B, 3, 5, 5)
        h = F.relu(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(h.view(h.size(0), -1))


class Functional(nn.Module):
    """Parameters used through F.linear, addmm (a (in, out) weight, like GPT-2's Conv1D), @ and F.conv2d."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(16))
        self.w2, self.bias2 = nn.Parameter(torch.randn(16, 12)), nn.Parameter(torch.randn(12))
        self.w3 = nn.Parameter(torch.randn(12, 6))
        self.k, self.head = nn.Parameter(torch.randn(4, 3, 3, 3)), nn.Linear(4, 6)

    def forward(self, x, img):
        h = torch.addmm(self.bias2, torch.relu(F.linear(x, self.w1, self.b1)), self.w2)
        return h @ self.w3 + self.head(F.conv2d(img, self.k, None, 1, 1).mean((2, 3)))


def randomize_norms(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial affine params and running stats (fresh ones hide bugs)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g)
            m.running_mean.data = torch.randn(n, generator=g)
            m.running_var.data = torch.rand(n, generator=g) + 0.5
    return model


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x, n_rep: int):
    """transformers' Llama: (B, KV, T, D) -> (B, KV * n_rep, T, D), each KV head n_rep times in a row."""
    b, kv, t, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, kv, n_rep, t, d).reshape(b, kv * n_rep, t, d)


class Attention(nn.Module):
    """Hand-written attention as in transformers' Llama: separate q/k/v/o projections, a view into
    heads with the head count as a literal, rotary embeddings, grouped KV heads (`kv` of them,
    read through repeat_kv, sdpa's enable_gqa or repeat_interleave), sdpa or explicit softmax."""

    def __init__(self, dim: int = 32, heads: int = 4, kv: int | None = None, how: str = "sdpa", bias: bool = True) -> None:
        super().__init__()
        self.heads, self.kv, self.d, self.how = heads, kv or heads, dim // heads, how
        self.q_proj = nn.Linear(dim, heads * self.d, bias=bias)
        self.k_proj = nn.Linear(dim, self.kv * self.d, bias=bias)
        self.v_proj = nn.Linear(dim, self.kv * self.d, bias=bias)
        self.o_proj = nn.Linear(heads * self.d, dim, bias=bias)

    def forward(self, x):  # (B, T, dim)
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.d).transpose(1, 2)
        pos = torch.arange(t, dtype=x.dtype, device=x.device)[:, None] / (10.0 ** torch.arange(self.d // 2) / self.d)
        cos, sin = torch.cat((pos, pos), -1).cos()[None, None], torch.cat((pos, pos), -1).sin()[None, None]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        n_rep = self.heads // self.kv
        if self.how == "gqa":
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            if self.how == "interleave":
                k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
            else:
                k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
            if self.how == "softmax":
                s = q @ k.transpose(2, 3) / math.sqrt(self.d)
                s = s.masked_fill(x.new_ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
                a = torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)
            else:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(a.transpose(1, 2).reshape(b, t, self.heads * self.d))


class SwiGLU(nn.Module):
    """LLaMA's MLP: down(silu(gate(x)) * up(x)); gate and up tied through the product."""

    def __init__(self, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Block(nn.Module):
    """A LLaMA decoder block: RMSNorm, grouped-KV attention, RMSNorm, SwiGLU, residuals."""

    def __init__(self, dim: int = 32, heads: int = 4, kv: int = 2, hidden: int = 64, how: str = "sdpa") -> None:
        super().__init__()
        self.norm1, self.attn = RMSNorm(dim), Attention(dim, heads, kv, how, bias=False)
        self.norm2, self.mlp = RMSNorm(dim), SwiGLU(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """Token and position embeddings, a pre-norm block (LayerNorm, attention, LayerNorm, GELU MLP),
    a final norm and an LM head tied to the token embedding: the residual stream runs through all."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, rms: bool = False) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(16, dim)
        norm = (lambda: RMSNorm(dim)) if rms else (lambda: nn.LayerNorm(dim))
        self.ln1, self.attn, self.ln2, self.ln_f = norm(), Attention(dim, heads), norm(), norm()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.tok.weight

    def forward(self, ids):  # (B, T)
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        x = x + self.attn(self.ln1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.lm_head(self.ln_f(x))


class FusedAttention(nn.Module):
    """GPT-2 / nanoGPT style: one c_attn makes q, k and v, split by an int; heads by a view with -1."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.dim = heads, dim
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split(self.dim, dim=2)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, -1))
