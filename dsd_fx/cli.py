"""The dsd-fx command: `demo` runs the whole Dense -> Sparse -> re-Dense flow and proves the result."""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class DemoNet(nn.Module):
    """A small CNN for 1x8x8 images, 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def synthetic_data(seed: int, n: int = 2048):
    """A 10-class task made by a fixed random teacher network: no download."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    teacher = torch.randn(64, 10, generator=g)
    y = (x.flatten(1) @ teacher).argmax(1)
    split = n * 3 // 4
    return (x[:split], y[:split]), (x[split:], y[split:])


def _epoch(model, opt, data, batch=64):
    x, y = data
    model.train()
    total = 0.0
    for i in range(0, len(x), batch):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[i : i + batch]), y[i : i + batch])
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(x[i : i + batch])
    return total / len(x)


def _accuracy(model, data):
    model.eval()
    with torch.no_grad():
        return float((model(data[0]).argmax(1) == data[1]).float().mean())


def demo(args: argparse.Namespace) -> int:
    import dsd_fx

    torch.manual_seed(args.seed)
    train, test = synthetic_data(args.seed)
    model = DemoNet()
    reference = copy.deepcopy(model)  # the never-sparsified architecture
    rows = []

    def phase(name, net, lr, epochs, sparsity):
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)  # a fresh optimizer per phase
        t0 = time.perf_counter()
        loss = 0.0
        for _ in range(epochs):
            loss = _epoch(net, opt, train)
        rows.append((name, epochs, sparsity, loss, _accuracy(net, test), time.perf_counter() - t0))

    phase("dense", model, args.lr, args.epochs, "0%")
    sparse = dsd_fx.transform(model, phase="sparse", sparsity=args.sparsity)
    phase("sparse", sparse, args.lr, args.epochs, f"{args.sparsity:.0%}")
    dense = dsd_fx.transform(sparse, phase="dense")
    phase("re-dense", dense, args.lr * 0.1, args.epochs, "0%")

    print(f"{'phase':<9} {'epochs':>6} {'sparsity':>8} {'train loss':>10} {'test acc':>8} {'time':>7}")
    for name, ep, sp, loss, acc, t in rows:
        print(f"{name:<9} {ep:>6} {sp:>8} {loss:>10.4f} {acc:>8.3f} {t:>6.1f}s")
    os.makedirs(args.out, exist_ok=True)
    example = (test[0][:1],)
    path = os.path.join(args.out, "model.onnx")
    dsd_fx.export_onnx(dense, example, path)
    report = dsd_fx.verify_zero_overhead(reference, dense, example)
    with open(os.path.join(args.out, "zero_overhead.txt"), "w") as f:
        f.write(report.table + "\n")
    print()
    print(report.table)
    print(f"\nwrote {path} and {os.path.join(args.out, 'zero_overhead.txt')}")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsd-fx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train Dense -> Sparse -> re-Dense on a small model, export ONNX, prove zero overhead")
    p.add_argument("--epochs", type=int, default=8, help="epochs per phase (default 8)")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction pruned in the sparse phase (default 0.5)")
    p.add_argument("--lr", type=float, default=0.05, help="dense learning rate; re-dense uses a tenth (default 0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="dsd_fx_out", help="output folder (default dsd_fx_out)")
    p.set_defaults(fn=demo)
    args = parser.parse_args(argv)
    if getattr(args, "epochs", 1) < 1:
        parser.error("--epochs must be at least 1")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
