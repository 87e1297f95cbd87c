"""The demo's two runs: D -> S -> D through `dsd_fx.DSD`, and the dense baseline forked from its dense phase."""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch import fx

from dsd_fx.demo.models import evaluate, sgd, train_epoch

PHASES = ("dense", "sparse", "redense")
LABEL = {"dense": "dense", "sparse": "sparse", "redense": "re-dense"}


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


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the weights of 2+ dimensions, as the forward sees them (masks applied)."""
    from dsd_fx import current_masks

    masks = current_masks(model) if isinstance(model, fx.GraphModule) else {}
    weights = [p.detach() * masks[n] if n in masks else p.detach() for n, p in model.named_parameters() if p.dim() >= 2]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@dataclass
class Task:
    """What one demo run trains: the data, the model's factory, and the resolved hyper-parameters."""

    data: str
    model: str
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    net: nn.Module
    epochs: int
    lr: float
    batch: int
    seed: int


@dataclass
class PhaseRow:
    phase: str
    epochs: int
    lr: float
    sparsity: float
    train_loss: float
    test_accuracy: float
    baseline_train_loss: float
    baseline_test_accuracy: float
    seconds: float


@dataclass
class Runs:
    """Both runs, trained: the per-phase rows, the per-epoch curves, the phases' epoch spans."""

    rows: list[PhaseRow]
    curves: dict[str, list[dict]]
    bounds: list[tuple[str, int, int]]
    final: nn.Module
    baseline: nn.Module


@dataclass
class Loop:
    """How a demo trains and measures, for `run_both`: one round (an epoch, or a fixed number of steps)
    of training, the evaluation after each round, the optimizer of every phase of both runs."""

    rounds: int  # per phase
    train_round: Callable[[nn.Module, torch.optim.Optimizer, torch.Generator, Callable | None], float]  # -> train loss
    evaluate: Callable[[nn.Module], dict[str, float]]  # -> the held-out metrics, first the one the bar shows
    optimizer: Callable[..., torch.optim.Optimizer]  # (parameters, lr), fresh per phase as DSD's
    seed: int


@dataclass
class PhaseSummary:
    """One phase of both runs: the last round's train loss and metrics of each."""

    phase: str
    rounds: int
    lr: float
    sparsity: float
    dsd: dict[str, float]
    baseline: dict[str, float]
    seconds: float


def run_both(dsd, loop: Loop) -> tuple[list[PhaseSummary], dict[str, list[dict]], list[tuple[str, int, int]], nn.Module, nn.Module]:
    """D -> S -> D through `dsd`; the baseline forks at the end of the dense phase and stays dense.

    The fork copies the network and the batch-order generator, so both runs see the same batches in
    the same order and differ only by what DSD does. Each phase of each run has a fresh optimizer;
    the baseline's last phase runs at the re-dense rate (the same learning-rate drop).
    Returns (per-phase summaries, per-round curves of both runs, the phases' round spans, the final
    D -> S -> D model, the baseline).
    """
    gen = torch.Generator().manual_seed(loop.seed)
    curves: dict[str, list[dict]] = {"dsd": [], "baseline": []}
    rows, bounds, baseline = [], [], None
    base_opt = base_gen = None
    for phase in PHASES:
        net, opt = dsd.begin(phase)
        lr = opt.param_groups[0]["lr"]
        if phase == "sparse":  # fork: the baseline continues from the dense phase's weights and batch order
            base_gen = torch.Generator().manual_seed(loop.seed)
            base_gen.set_state(gen.get_state())
        if base_gen is not None:
            base_opt = loop.optimizer(baseline.parameters(), lr)  # the same lr drop as DSD's re-dense
        bar, t0, first = Progress(LABEL[phase], loop.rounds), time.perf_counter(), len(curves["dsd"]) + 1
        for _ in range(loop.rounds):
            ours = {"loss": loop.train_round(net, opt, gen, dsd.step)}
            ours.update(loop.evaluate(net))
            dsd.log(**ours)
            if base_gen is not None:
                theirs = {"loss": loop.train_round(baseline, base_opt, base_gen, None)}
                theirs.update(loop.evaluate(baseline))
            else:
                theirs = dict(ours)  # one run until the fork
            epoch = len(curves["dsd"]) + 1
            curves["dsd"].append({"epoch": epoch, "phase": phase, **ours})
            curves["baseline"].append({"epoch": epoch, "phase": phase, **theirs})
            key = next(k for k in ours if k != "loss")
            bar.update(f"loss {ours['loss']:.4f} {key} {ours[key]:.3f} | baseline {theirs[key]:.3f}")
        if phase == "dense":
            baseline = copy.deepcopy(net)  # before the sparse transform zeroes the pruned weights
        rows.append(PhaseSummary(LABEL[phase], loop.rounds, lr, weight_sparsity(net), ours, theirs, time.perf_counter() - t0))
        bounds.append((phase, first, len(curves["dsd"])))
    return rows, curves, bounds, dsd.model, baseline


def train_both(dsd, task: Task) -> Runs:
    """The MNIST-1D demo's two runs (`run_both` by epochs, test accuracy after each)."""
    loop = Loop(task.epochs, lambda net, opt, gen, on_step: train_epoch(net, opt, task.train, task.batch, gen, on_step=on_step),
                lambda net: {"accuracy": evaluate(net, task.test)[0]}, sgd, task.seed)
    summaries, curves, bounds, final, baseline = run_both(dsd, loop)
    rows = [PhaseRow(r.phase, r.rounds, r.lr, r.sparsity, r.dsd["loss"], r.dsd["accuracy"], r.baseline["loss"],
                     r.baseline["accuracy"], r.seconds) for r in summaries]
    return Runs(rows, curves, bounds, final, baseline)
