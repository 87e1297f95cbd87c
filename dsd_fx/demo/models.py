"""The demo's models and training recipe, shared with benchmarks/accuracy.py.

MNIST-1D's models follow the shapes of the dataset paper's baselines (Greydanus 2020): a CNN of three
stride-2 Conv1d layers and a linear head (32 channels, not the paper's 25, so that every layer but
the first has a reduction size divisible by 4 and can take 2:4 or 1:4), an MLP of 100 hidden units with one
residual block, a bidirectional GRU of 6 units per direction read at every step. Each is our own
code, trained with the recipe below (SGD with momentum, a fresh optimizer per phase), not the
paper's Adam.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class MNIST1DCNN(nn.Module):
    """Three stride-2 Conv1d (kernels 5, 3, 3; 40 -> 19 -> 10 -> 5 samples) and a linear head."""

    def __init__(self, channels: int = 32, length: int = 40) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        out = length
        for k in (5, 3, 3):
            out = (out + 2 - k) // 2 + 1
        self.fc = nn.Linear(channels * out, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x.unsqueeze(1)))  # N x 40 -> N x 1 x 40
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.flatten(1))


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 images, 10 classes (the demo's model on scikit-learn's digits)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class MLP(nn.Module):
    """in -> hidden -> hidden (residual) -> 10, ReLU; the input is flattened."""

    def __init__(self, in_features: int, hidden: int = 100) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 10)

    def forward(self, x):
        h = F.relu(self.fc1(x.flatten(1)))
        h = h + F.relu(self.fc2(h))
        return self.fc3(h)


class GRUNet(nn.Module):
    """A bidirectional GRU over `steps` steps of `features` values; a linear head reads every step."""

    def __init__(self, steps: int, features: int, hidden: int = 6) -> None:
        super().__init__()
        self.steps, self.features = steps, features
        self.gru = nn.GRU(features, hidden, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * hidden * steps, 10)

    def forward(self, x):
        out, _ = self.gru(x.flatten(1).unflatten(1, (self.steps, self.features)))
        return self.fc(out.flatten(1))


@dataclass(frozen=True)
class Recipe:
    """How one model is trained on one dataset: its factory, learning rate and epochs per phase."""

    make: Callable[[], nn.Module]
    lr: float
    epochs: int
    batch: int = 100


RECIPES: dict[tuple[str, str], Recipe] = {
    ("mnist1d", "cnn"): Recipe(MNIST1DCNN, lr=0.1, epochs=20),
    ("mnist1d", "mlp"): Recipe(lambda: MLP(40), lr=0.05, epochs=20),
    ("mnist1d", "gru"): Recipe(lambda: GRUNet(40, 1), lr=0.1, epochs=10),  # 0.3 left 1 seed of 3 stuck near 60%
    ("digits", "cnn"): Recipe(DigitsCNN, lr=0.05, epochs=10, batch=64),
    ("digits", "mlp"): Recipe(lambda: MLP(64), lr=0.05, epochs=10, batch=64),
    ("digits", "gru"): Recipe(lambda: GRUNet(8, 8), lr=0.3, epochs=10, batch=64),  # one row of pixels per step
}


def sgd(params, lr: float) -> torch.optim.Optimizer:
    """The recipe's optimizer, fresh for every phase (no momentum of a pruned weight carries over)."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def train_epoch(model, opt, data, batch: int, generator: torch.Generator, on_step=None) -> float:
    """One epoch of shuffled mini-batches; returns the mean training loss."""
    x, y = data
    model.train()
    total = 0.0
    for idx in torch.randperm(len(x), generator=generator).split(batch):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step()
        total += float(loss.detach()) * len(idx)
    return total / len(x)


def evaluate(model, data) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on `data`, in eval mode."""
    model.eval()
    with torch.no_grad():
        logits = model(data[0])
    return float((logits.argmax(1) == data[1]).float().mean()), float(F.cross_entropy(logits, data[1]))
