"""Model factories for the dsd-fx command line: `dsd-fx diff examples.models:mlp --input-shape 1,8`."""
import torch
import torch.nn as nn


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


class CausalMixer(nn.Module):
    """Each position mixes the positions up to it, through a mask built from the input's length:
    torch.fx cannot trace it, torch.export can (`--capture export`, or the default `auto`)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_in, self.fc_out = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):  # (B, T, 8)
        t = x.shape[1]
        mix = torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1).unsqueeze(1)
        return self.fc_out(mix @ torch.relu(self.fc_in(x)))


def causal() -> nn.Module:
    return CausalMixer()


if __name__ == "__main__":
    print(mlp(), cnn(), causal())
