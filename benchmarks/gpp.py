"""Grow-Push-Prune against its ablations and against Torch-Pruning, at equal parameter budgets.

    python benchmarks/gpp.py                     # CNN and MLP on MNIST-1D, CNN on digits; budgets 0.5 and 0.25; 5 seeds
    python benchmarks/gpp.py --seeds 3 --epochs 6 --out benchmarks/results_gpp.txt
    python benchmarks/gpp.py --quick             # a smoke test

Per model and seed: one dense phase of E epochs, shared by every method (copied), then, to the
budget (a fraction of the dense model's parameters):
  gpp            push phases (cross-entropy + dsd_fx.push_loss on the classifier's input, E/2 epochs)
                 each followed by a prune step of --step of every channel group ranked by --importance,
                 until the budget; a fine-tune of E epochs at lr/10
  no push        the same schedule with the push term off (importance alone)
  l1             the same schedule, no push, L1 magnitude importance (iterative L1 channel pruning)
  torch-pruning  Torch-Pruning's MagnitudePruner (L1), one shot, at the channel ratio (bisected) that
                 reaches the budget, then as many epochs of fine-tuning as the gpp run trained after
                 its dense phase
  dense          never pruned, trained for as many epochs as the gpp run (the unpruned reference)
Reported: test accuracy mean +- std over seeds, the parameter fraction reached, and the
difference to gpp paired by seed. Writes --out (default benchmarks/results_gpp.txt).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
import warnings

import torch

import dsd_fx
from dsd_fx.demo import load_task
from dsd_fx.demo_gpp import push_epoch
from dsd_fx.demo_models import evaluate, sgd, train_epoch

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("gpp", "no push", "l1", "torch-pruning", "dense")


def _task(data: str, model: str, seed: int, epochs: int | None):
    args = argparse.Namespace(data=data, model=model, epochs=epochs, quick=False, lr=None, batch=None, seed=seed)
    return load_task(args)


def _batches(task, n: int = 10):
    x, y = task.train
    return [(x[i:i + task.batch], y[i:i + task.batch]) for i in range(0, min(len(x), n * task.batch), task.batch)]


def _schedule(task, net, gen, target, step, push_weight, importance):
    """GPP's schedule on a copy of the dense net; (accuracy, params, epochs trained after the dense phase)."""
    gpp = dsd_fx.GPP(copy.deepcopy(net), sgd, lr=task.lr, example_args=(task.test[0][:1],), target_params=target,
                     step=step, importance=importance, push_weight=push_weight, finetune_lr_scale=0.1)
    push_epochs, trained = max(1, task.epochs // 2), 0
    while not gpp.done:
        model, opt = gpp.begin("push")
        for _ in range(push_epochs):
            if push_weight:
                push_epoch(gpp, model, opt, task.train, task.batch, gen)
            else:
                train_epoch(model, opt, task.train, task.batch, gen)
        trained += push_epochs
        gpp.prune(data=_batches(task))
    model, opt = gpp.begin("finetune")
    for _ in range(task.epochs):
        train_epoch(model, opt, task.train, task.batch, gen)
    return evaluate(model, task.test)[0], dsd_fx.cost(model, (task.test[0][:1],)).params, trained + task.epochs


def _tp_prune(net, x, ratio):
    import torch_pruning as tp

    model = copy.deepcopy(net)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
                              ignored_layers=[head]).step()
    return model


def _torch_pruning(task, net, gen, target, epochs):
    """Torch-Pruning's L1 MagnitudePruner, one shot, at the channel ratio (bisected) that brings the
    parameters to the budget, then `epochs` of fine-tuning at lr/10."""
    x = task.test[0][:1]
    budget = target * dsd_fx.cost(net, (x,)).params
    low, high = 0.0, 0.95
    for _ in range(14):
        mid = (low + high) / 2
        low, high = (mid, high) if dsd_fx.cost(_tp_prune(net, x, mid), (x,)).params > budget else (low, mid)
    model = _tp_prune(net, x, high)
    opt = sgd(model.parameters(), task.lr * 0.1)
    for _ in range(epochs):
        train_epoch(model, opt, task.train, task.batch, gen)
    return evaluate(model, task.test)[0], dsd_fx.cost(model, (x,)).params


def _dense(task, net, gen, epochs):
    model = copy.deepcopy(net)
    opt = sgd(model.parameters(), task.lr)
    for k in range(epochs):
        if k == epochs - task.epochs:  # the same last phase at lr/10 as the others' fine-tune
            opt = sgd(model.parameters(), task.lr * 0.1)
        train_epoch(model, opt, task.train, task.batch, gen)
    return evaluate(model, task.test)[0], dsd_fx.cost(model, (task.test[0][:1],)).params


def one_seed(data, model_name, seed, targets, args) -> dict:
    """{(target, method): (accuracy, params fraction)} for one seed, every method from one dense phase."""
    task = _task(data, model_name, seed, args.epochs)
    gen = torch.Generator().manual_seed(seed)
    net = task.net
    opt = sgd(net.parameters(), task.lr)
    for _ in range(task.epochs):
        train_epoch(net, opt, task.train, task.batch, gen)
    start = dsd_fx.cost(net, (task.test[0][:1],)).params
    out = {}
    for target in targets:
        fork = lambda: torch.Generator().manual_seed(seed * 1000 + int(target * 100))  # noqa: E731 - same batches per method
        acc, params, epochs = _schedule(task, net, fork(), target, args.step, 1.0, args.importance)
        out[(target, "gpp")] = (acc, params / start)
        acc, params, _ = _schedule(task, net, fork(), target, args.step, 0.0, args.importance)
        out[(target, "no push")] = (acc, params / start)
        acc, params, _ = _schedule(task, net, fork(), target, args.step, 0.0, "l1")
        out[(target, "l1")] = (acc, params / start)
        acc, params = _torch_pruning(task, net, fork(), target, epochs)
        out[(target, "torch-pruning")] = (acc, params / start)
        acc, params = _dense(task, net, fork(), epochs)
        out[(target, "dense")] = (acc, params / start)
    return out


def _stat(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def report(name, per_seed, targets) -> list[str]:
    lines = [f"## {name}", f"{'budget':>6} {'method':<14} {'test accuracy':>18} {'params':>14} {'acc - gpp (paired)':>22}"]
    for target in targets:
        for method in METHODS:
            acc = [s[(target, method)][0] for s in per_seed]
            frac = [s[(target, method)][1] for s in per_seed]
            diff = [s[(target, method)][0] - s[(target, "gpp")][0] for s in per_seed]
            (a, sa), (f, sf), (d, sd) = _stat(acc), _stat(frac), _stat(diff)
            paired = "" if method == "gpp" else f"{d:+.4f} +- {sd:.4f}"
            lines.append(f"{target:>6.2f} {method:<14} {a:.4f} +- {sa:.4f} {f:>7.3f} +- {sf:.3f} {paired:>22}")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, help="E, epochs of the dense phase and of the fine-tune (default: the recipe's)")
    p.add_argument("--targets", default="0.5,0.25", help="parameter budgets, fractions of the dense model (default 0.5,0.25)")
    p.add_argument("--step", type=float, default=0.3, help="fraction of every channel group per prune step (default 0.3)")
    p.add_argument("--importance", default="discriminant", help="gpp's importance: discriminant (default) or l1")
    p.add_argument("--models", default="mnist1d:cnn,mnist1d:mlp,digits:cnn", help="data:model pairs")
    p.add_argument("--quick", action="store_true", help="2 seeds, 2 epochs, MNIST-1D CNN, budget 0.5")
    p.add_argument("--out", default=os.path.join(HERE, "results_gpp.txt"))
    args = p.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.models, args.targets = 2, 2, "mnist1d:cnn", "0.5"
    targets = [float(t) for t in args.targets.split(",")]
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    t0 = time.perf_counter()
    lines = [f"# benchmarks/gpp.py {' '.join(sys.argv[1:])}: {args.seeds} seeds, step {args.step}, importance "
             f"{args.importance}, torch {torch.__version__}, 1 thread", ""]
    for pair in args.models.split(","):
        data, model_name = pair.split(":")
        per_seed = [one_seed(data, model_name, seed, targets, args) for seed in range(args.seeds)]
        lines += report(f"{model_name} on {data}", per_seed, targets)
        print("\n".join(lines[-(len(targets) * len(METHODS) + 3):]), flush=True)
    lines.append(f"# {time.perf_counter() - t0:.0f} s")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(lines[-1])


if __name__ == "__main__":
    main()
