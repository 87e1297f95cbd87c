"""Does DSD beat dense training, and does SR-STE 2:4 reach dense? Measured on scikit-learn's digits.

    python benchmarks/accuracy.py            # 5 seeds, 10 epochs per phase (a few minutes on 2 cores)
    python benchmarks/accuracy.py --quick    # 2 seeds, 2 epochs per phase (under a minute)

Part 1, DSD (Han et al. 2017) on two models, the digits CNN of `dsd-fx demo` and an LSTM that
reads each 8x8 image as a sequence of 8 rows. Three schedules of the same length, 3 x E epochs,
each phase with a fresh SGD (momentum 0.9, weight decay 5e-4) and the same learning rates:

    dense        E at lr, E at lr, E at lr/10       (the same lr drop, never pruned)
    sparse-only  E at lr, E sparse at lr, E sparse at lr/10   (the final model is 50% sparse)
    DSD          E at lr, E sparse at lr, E re-dense at lr/10

Part 2, SR-STE (Zhou et al. 2021): 2:4 sparse from the first step, for 3 x E epochs, with SR-STE
(lambda_w = 2e-4), with plain STE (lambda_w = 0), and dense, on the CNN; SAD (the fraction of
the masks' entries that changed since the start) is recorded every epoch and plotted.

The split is fixed (seed 0, 25% held out); each seed changes the initialisation and batch order.
Reported: test accuracy and test loss, mean +- std over seeds, and the paired difference to dense
(same seed, same init). Writes benchmarks/results_accuracy.txt (or --out) and a SAD plot PNG.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn

import dsd_fx
from dsd_fx.demo import DemoNet, evaluate, load_digits, sgd, train_epoch

HERE = os.path.dirname(os.path.abspath(__file__))


class RowLSTM(nn.Module):
    """An 8x8 digit as a sequence of 8 rows of 8 pixels."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        out, _ = self.lstm(x.flatten(1, 2))  # N x 1 x 8 x 8 -> N x 8 x 8
        return self.head(out[:, -1])


MODELS = {"cnn": (DemoNet, 0.05), "lstm": (RowLSTM, 0.5)}


def run_schedule(kind: str, schedule: str, seed: int, epochs: int, train, test) -> tuple[float, float]:
    make, lr = MODELS[kind]
    torch.manual_seed(seed)
    model = make()
    gen = torch.Generator().manual_seed(seed)

    def phase(net, rate):
        opt = sgd(net.parameters(), rate)  # a fresh optimizer per phase, in every schedule
        for _ in range(epochs):
            train_epoch(net, opt, train, 64, gen)

    phase(model, lr)
    if schedule == "dense":
        phase(model, lr)
        phase(model, lr / 10)
        return evaluate(model, test)
    sparse = dsd_fx.transform(model, phase="sparse", sparsity=0.5)
    phase(sparse, lr)
    if schedule == "sparse-only":
        phase(sparse, lr / 10)
        return evaluate(sparse, test)
    dense = dsd_fx.transform(sparse, phase="dense")
    phase(dense, lr / 10)
    return evaluate(dense, test)


def run_nm(method: str, seed: int, epochs: int, train, test) -> tuple[float, float, list[float]]:
    """2:4 from scratch (SR-STE or STE) or dense, 3 x epochs with the lr drop for the last third."""
    make, lr = MODELS["cnn"]
    torch.manual_seed(seed)
    model = make()
    gen = torch.Generator().manual_seed(seed)
    net = model if method == "dense" else dsd_fx.transform(model, pattern="2:4", method=method)
    start = dsd_fx.current_masks(net) if method != "dense" else None
    sads = []
    for k, rate in enumerate((lr, lr, lr / 10)):
        opt = sgd(net.parameters(), rate)
        for _ in range(epochs):
            train_epoch(net, opt, train, 64, gen)
            if start is not None:
                sads.append(dsd_fx.sad(start, dsd_fx.current_masks(net)).fraction)
    acc, loss = evaluate(net, test)
    return acc, loss, sads


def _ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {sd:.4f}"


def _plot_sad(curves: dict[str, list[list[float]]], epochs: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (method, runs), color in zip(curves.items(), ("tab:red", "tab:blue")):
        xs = range(1, len(runs[0]) + 1)
        mean = [statistics.mean(r[i] for r in runs) for i in range(len(runs[0]))]
        for r in runs:
            ax.plot(xs, r, color=color, alpha=0.25, lw=0.8)
        ax.plot(xs, mean, color=color, lw=2, label=f"{method} (mean of {len(runs)} seeds)")
    for b in (epochs + 0.5, 2 * epochs + 0.5):
        ax.axvline(b, color="0.5", ls="--", lw=0.8)
    ax.set_xlabel("epoch (lr drops 10x for the last third)")
    ax.set_ylabel("SAD: fraction of mask entries changed since start")
    ax.set_title("2:4 from scratch on digits CNN: SR-STE vs STE")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 seeds, 2 epochs per phase")
    p.add_argument("--seeds", type=int, help="number of seeds (default 5, --quick 2)")
    p.add_argument("--epochs", type=int, help="epochs per phase (default 10, --quick 2)")
    p.add_argument("--train-fraction", type=float, default=1.0,
                   help="train on this fraction of the training split (a data-poor regime; default 1.0)")
    p.add_argument("--skip-nm", action="store_true", help="part 1 only (no SR-STE runs)")
    p.add_argument("--out", default=os.path.join(HERE, "results_accuracy.txt"), help="where to write the table")
    args = p.parse_args(argv)
    seeds = args.seeds or (2 if args.quick else 5)
    epochs = args.epochs or (2 if args.quick else 10)
    if seeds < 1 or epochs < 1:
        p.error("--seeds and --epochs must be at least 1")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    warnings.filterwarnings("ignore", message="dsd_fx: 2:4 skips")  # conv1 has 1 input channel: it stays dense
    if not 0 < args.train_fraction <= 1:
        p.error("--train-fraction must be in (0, 1]")
    train, test = load_digits(0)
    keep = max(10, int(len(train[0]) * args.train_fraction))
    train = (train[0][:keep], train[1][:keep])  # the split is already shuffled
    flags = " ".join(a for a in (argv if argv is not None else sys.argv[1:]) if a != "--out" and not a.endswith(".txt"))
    lines = [f"# benchmarks/accuracy.py {flags}: digits ({len(train[0])} train / "
             f"{len(test[0])} test), {seeds} seeds, {epochs} epochs per phase (3 phases), torch {torch.__version__}",
             "", "## DSD vs dense (same epochs, same lr drop) vs sparse-only, 50% unstructured",
             f"{'model':<5} {'schedule':<12} {'test accuracy':>18} {'test loss':>18} {'acc - dense (paired)':>22}"]
    t0 = time.perf_counter()
    for kind in MODELS:
        results = {s: [run_schedule(kind, s, seed, epochs, train, test) for seed in range(seeds)]
                   for s in ("dense", "sparse-only", "DSD")}
        for s, runs in results.items():
            diff = [a - d for (a, _), (d, _) in zip(runs, results["dense"])]
            paired = "" if s == "dense" else _ms(diff)
            lines.append(f"{kind:<5} {s:<12} {_ms([a for a, _ in runs]):>18} {_ms([l for _, l in runs]):>18} {paired:>22}")
        print("\n".join(lines[-3:]), file=sys.stderr)
    if args.skip_nm:
        text = "\n".join(lines + ["", f"# {time.perf_counter() - t0:.0f} s"])
        print(text)
        with open(args.out, "w") as f:
            f.write(text + "\n")
        return 0
    lines += ["", "## 2:4 from scratch, CNN: SR-STE vs STE vs dense (3 x epochs each)",
              f"{'method':<8} {'test accuracy':>18} {'test loss':>18} {'final SAD':>18}"]
    curves = {}
    for method in ("dense", "sr-ste", "ste"):
        runs = [run_nm(method, seed, epochs, train, test) for seed in range(seeds)]
        final_sad = _ms([r[2][-1] for r in runs]) if method != "dense" else "-"
        lines.append(f"{method:<8} {_ms([r[0] for r in runs]):>18} {_ms([r[1] for r in runs]):>18} {final_sad:>18}")
        if method != "dense":
            curves[method] = [r[2] for r in runs]
        print(lines[-1], file=sys.stderr)
    plot = os.path.splitext(args.out)[0] + "_sad.png"
    _plot_sad(curves, epochs, plot)
    lines += ["", f"# {time.perf_counter() - t0:.0f} s; SAD plot: {os.path.relpath(plot)}"]
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
