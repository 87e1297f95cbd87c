"""`dsd-fx demo`: Dense -> Sparse -> re-Dense on scikit-learn's handwritten digits, with the evidence.

It trains a small CNN through the three phases with `dsd_fx.DSD`, prints a table per phase and
writes, under the output folder:

    model.onnx          the final model (re-dense), exported with the dynamo exporter
    reference.onnx      the same architecture never sparsified, exported the same way
    zero_overhead.txt   the node-by-node comparison of the two, and onnxruntime vs torch
    training.png        train loss and test accuracy per epoch, phase boundaries marked
    metrics.json        every number the table and the plot show
    diffs/NN_<phase>_<pass>/  per-pass graph diff: before.py, after.py, diff.txt, diff.dot, diff.png
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

PHASES = ("dense", "sparse", "redense")
LABEL = {"dense": "dense", "sparse": "sparse", "redense": "re-dense"}
OUTPUTS = ("model.onnx", "reference.onnx", "zero_overhead.txt", "training.png", "metrics.json")


class DemoNet(nn.Module):
    """A small CNN for 1x8x8 images, 10 classes."""

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


class DemoError(Exception):
    """Bad input to the demo, found before any training."""


def load_digits(seed: int, test_fraction: float = 0.25):
    """scikit-learn's 1,797 8x8 digits (shipped inside the package: no download), split by `seed`.

    Returns ((x_train, y_train), (x_test, y_test)); x is N x 1 x 8 x 8, standardised with the
    training split's mean and std.
    """
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as err:
        raise DemoError(
            "the demo's dataset ships with scikit-learn, which is not installed: "
            "pip install 'dsd-fx[demo]' (or pip install scikit-learn matplotlib)"
        ) from err
    digits = sk_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return (x[train], y[train]), (x[test], y[test])


class Progress:
    """One progress bar per phase: redrawn in place on a terminal, one line per phase otherwise."""

    def __init__(self, label: str, total: int, stream=None, width: int = 30) -> None:
        self.label, self.total, self.width, self.done = label, total, width, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, info: str = "") -> None:
        self.done += 1
        if self.tty or self.done == self.total:
            filled = self.width * self.done // self.total
            bar = "#" * filled + "-" * (self.width - filled)
            end = "\n" if self.done == self.total else ""
            self.stream.write(f"\r{self.label:<9}[{bar}] {self.done}/{self.total} {info} "
                              f"{time.perf_counter() - self.t0:5.1f}s{end}")
            self.stream.flush()


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


def sgd(params, lr: float) -> torch.optim.Optimizer:
    """The demo's optimizer, fresh for every phase."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the weights of 2+ dimensions, as the forward sees them (masks applied)."""
    from dsd_fx.state import current_masks

    masks = current_masks(model) if isinstance(model, fx.GraphModule) else {}
    weights = [p.detach() * masks[n] if n in masks else p.detach() for n, p in model.named_parameters() if p.dim() >= 2]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@dataclass
class PhaseRow:
    phase: str
    epochs: int
    sparsity: float
    train_loss: float
    test_accuracy: float
    seconds: float


def _check_out(folder: str) -> str:
    folder = os.path.abspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dsd_fx-probe-"):
            pass
    except OSError as err:
        raise DemoError(f"cannot write to output folder {folder}: {err.strerror}; pass --out with a writable folder") from err
    return folder


def _plot(rows: list[dict], bounds: list[tuple[str, int, int]], path: str, title: str, sad=()) -> None:
    """Loss and accuracy per epoch, phases shaded; with SR-STE/STE, a third panel of SAD per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(3 if sad else 2, 1, sharex=True, figsize=(8, 8 if sad else 6))
    top, bottom = axes[0], axes[1]
    if sad:
        axes[2].plot([e for e, _ in sad], [f for _, f in sad], marker=".", color="tab:red")
        axes[2].set_ylabel("SAD since sparse start")
    top.plot(epochs, [r["loss"] for r in rows], marker=".", color="tab:blue")
    top.set_ylabel("train loss")
    top.set_yscale("log")
    bottom.plot(epochs, [r["accuracy"] for r in rows], marker=".", color="tab:green")
    bottom.set_ylabel("test accuracy")
    axes[-1].set_xlabel("epoch")
    shades = {"dense": "0.95", "sparse": "#fde7e7", "redense": "#e7f0fd"}
    for ax in axes:
        for name, first, last in bounds:
            ax.axvspan(first - 0.5, last + 0.5, color=shades[name], zorder=0)
            ax.axvline(first - 0.5, color="0.4", linestyle="--", linewidth=0.8)
        ax.grid(alpha=0.3)
    for name, first, last in bounds:
        top.text((first + last) / 2, 1.02, LABEL[name], transform=top.get_xaxis_transform(), ha="center", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """The demo; returns 0 if the zero-overhead proof holds, 1 if not."""
    import dsd_fx

    if getattr(args, "quick", False):
        args.epochs = 1
    if args.epochs < 1:
        raise DemoError(f"--epochs must be at least 1, got {args.epochs}")
    if args.pattern is None and not 0 < args.sparsity < 1:
        raise DemoError(f"--sparsity must be in (0, 1), got {args.sparsity}")
    if args.pattern is None and args.method != "fixed":
        raise DemoError(f"--method {args.method} needs --pattern N:M (e.g. --pattern 2:4 --method sr-ste)")
    try:
        import matplotlib  # noqa: F401 - needed for the plot at the end: fail now, not after training
    except ImportError as err:
        raise DemoError("the demo's plot needs matplotlib: pip install 'dsd-fx[demo]'") from err
    out = _check_out(args.out)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    train, test = load_digits(args.seed)
    model = DemoNet()
    reference = copy.deepcopy(model)  # the never-sparsified architecture
    diffs = os.path.join(out, "diffs")
    shutil.rmtree(diffs, ignore_errors=True)  # per-pass folders are numbered: start afresh
    sparse_opts = {"pattern": args.pattern, "method": args.method} if args.pattern else {"sparsity": args.sparsity}
    dsd = dsd_fx.DSD(
        model, sgd,
        lr=args.lr, redense_lr_scale=0.1, print_changed_dir=diffs, **sparse_opts,
        sad_every=-(-len(train[0]) // args.batch),  # SAD once per epoch (SR-STE / STE)
    )
    what = f"{args.pattern} {args.method}" if args.pattern else f"{args.sparsity:.0%} unstructured"
    print(f"dsd-fx demo: DemoNet on scikit-learn digits ({len(train[0])} train / {len(test[0])} test images), "
          f"{args.epochs} epochs per phase, sparse phase {what}, seed {args.seed}", file=sys.stderr)
    generator = torch.Generator().manual_seed(args.seed)
    rows: list[PhaseRow] = []
    per_epoch: list[dict] = []
    bounds: list[tuple[str, int, int]] = []
    for phase in PHASES:
        net, opt = dsd.begin(phase)
        bar = Progress(LABEL[phase], args.epochs)
        t0 = time.perf_counter()
        first = len(per_epoch) + 1
        for _ in range(args.epochs):
            loss = train_epoch(net, opt, train, args.batch, generator, on_step=dsd.step)
            acc, _ = evaluate(net, test)
            dsd.log(loss=loss, accuracy=acc)
            per_epoch.append({"epoch": len(per_epoch) + 1, "phase": phase, "loss": loss, "accuracy": acc})
            bar.update(f"loss {loss:.4f} acc {acc:.3f}")
        rows.append(PhaseRow(LABEL[phase], args.epochs, weight_sparsity(net), loss, acc, time.perf_counter() - t0))
        bounds.append((phase, first, len(per_epoch)))
    final = dsd.model

    table = [f"{'phase':<9} {'epochs':>6} {'sparsity':>8} {'train loss':>10} {'test acc':>8} {'time':>7}"]
    for r in rows:
        table.append(f"{r.phase:<9} {r.epochs:>6} {r.sparsity:>8.1%} {r.train_loss:>10.4f} {r.test_accuracy:>8.3f} {r.seconds:>6.1f}s")
    print("\n".join(table))

    example = (test[0][:1],)
    dsd_fx.export_onnx(final, example, os.path.join(out, "model.onnx"))
    dsd_fx.export_onnx(reference, example, os.path.join(out, "reference.onnx"))
    report = dsd_fx.verify_zero_overhead(reference, final, example)
    with open(os.path.join(out, "zero_overhead.txt"), "w") as f:
        f.write(report.table + "\n")
    first_sparse = next(first for name, first, _ in bounds if name == "sparse")
    sad = [(first_sparse + k, f) for h in dsd.history if h.sad for k, (_, f) in enumerate(h.sad)]
    _plot(per_epoch, bounds, os.path.join(out, "training.png"), f"DSD on digits: {what}, seed {args.seed}", sad)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("fn", "command")}, "phases": [r.__dict__ for r in rows], "epochs": per_epoch,
                   "sad": [{"phase": h.name, "sad": h.sad} for h in dsd.history if h.sad],
                   "zero_overhead": report.ok}, f, indent=1)
    print()
    print(report.table)
    print(f"\nwrote {', '.join(OUTPUTS)} and diffs/ (one folder per changed pass) to {out}")
    print(f"done in {time.perf_counter() - started:.1f} s (training, export, proof and pictures)")
    print(f"check the files yourself: dsd-fx check {os.path.join(out, 'reference.onnx')} {os.path.join(out, 'model.onnx')}")
    return 0 if report.ok else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=10, help="epochs per phase (default 10)")
    p.add_argument("--quick", action="store_true", help="1 epoch per phase: every output in a few seconds (a smoke test)")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction pruned in the sparse phase (default 0.5)")
    p.add_argument("--pattern", help="N:M pattern instead of a fraction, e.g. 2:4")
    p.add_argument("--method", default="fixed", choices=["fixed", "sr-ste", "ste"], help="N:M method (default fixed)")
    p.add_argument("--lr", type=float, default=0.05, help="dense learning rate; re-dense uses a tenth (default 0.05)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, the init and the batches (default 0)")
    p.add_argument("--out", default="dsd_fx_out", help="output folder (default dsd_fx_out)")
