"""The demo's two runs: D -> S -> D through `dsd_fx.DSD`, and the dense baseline forked from its dense phase."""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass

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


def train_both(dsd, task: Task) -> Runs:
    """D -> S -> D through `dsd`; the baseline forks at the end of the dense phase and stays dense.

    The fork copies the network and the batch-order generator, so both runs see the same batches in
    the same order and differ only by what DSD does. Each phase of each run has a fresh optimizer.
    """
    gen = torch.Generator().manual_seed(task.seed)
    runs = Runs([], {"dsd": [], "baseline": []}, [], task.net, task.net)
    base_opt = base_gen = None
    for phase in PHASES:
        net, opt = dsd.begin(phase)
        lr = opt.param_groups[0]["lr"]
        if phase == "sparse":  # fork: the baseline continues from the dense phase's weights and batch order
            base_gen = torch.Generator().manual_seed(task.seed)
            base_gen.set_state(gen.get_state())
        if base_gen is not None:
            base_opt = sgd(runs.baseline.parameters(), lr)  # the same lr drop as DSD's re-dense
        bar, t0, first = Progress(LABEL[phase], task.epochs), time.perf_counter(), len(runs.curves["dsd"]) + 1
        for _ in range(task.epochs):
            loss = train_epoch(net, opt, task.train, task.batch, gen, on_step=dsd.step)
            acc, _ = evaluate(net, task.test)
            dsd.log(loss=loss, accuracy=acc)
            if base_gen is not None:
                b_loss = train_epoch(runs.baseline, base_opt, task.train, task.batch, base_gen)
                b_acc, _ = evaluate(runs.baseline, task.test)
            else:
                b_loss, b_acc = loss, acc  # one run until the fork
            epoch = len(runs.curves["dsd"]) + 1
            runs.curves["dsd"].append({"epoch": epoch, "phase": phase, "loss": loss, "accuracy": acc})
            runs.curves["baseline"].append({"epoch": epoch, "phase": phase, "loss": b_loss, "accuracy": b_acc})
            bar.update(f"loss {loss:.4f} acc {acc:.3f} | baseline {b_acc:.3f}")
        if phase == "dense":
            runs.baseline = copy.deepcopy(net)  # before the sparse transform zeroes the pruned weights
        runs.rows.append(PhaseRow(LABEL[phase], task.epochs, lr, weight_sparsity(net), loss, acc, b_loss, b_acc,
                                  time.perf_counter() - t0))
        runs.bounds.append((phase, first, len(runs.curves["dsd"])))
    runs.final = dsd.model
    return runs
