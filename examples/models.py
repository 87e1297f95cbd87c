"""Model factories for the dsd-fx command line: `dsd-fx diff examples.models:mlp --input-shape 1,8`."""
import torch.nn as nn


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


if __name__ == "__main__":
    print(mlp(), cnn())
