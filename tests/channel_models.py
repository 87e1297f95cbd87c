"""Small models with each coupled-channel structure, for the channel and prune tests."""
from __future__ import annotations

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
