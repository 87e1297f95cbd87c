"""`dsd-fx demo --method gpp`: dense training, Grow-Push-Prune iterations to a parameter budget, a
fine-tune, beside the unpruned dense baseline; the pruned ONNX file with its proof."""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from dsd_fx.demo.dsd import DATA_NAMES, DemoError, check_out, load_task
from dsd_fx.demo.models import evaluate, sgd, train_epoch
from dsd_fx.demo.plot import new_figure
from dsd_fx.demo.runs import Progress

IMPORTANCE = "discriminant"  # the prune steps' ranking: GPP's own (dsd_fx.push.scoring)
PUSH_WEIGHT = 1.0  # the push loss's weight against cross-entropy (none in the sources)
OUTPUTS = ("model.onnx", "reference.onnx", "pruned_proof.txt", "gpp.png", "metrics.json")


@dataclass
class Row:
    """One phase of the GPP run, with the baseline's accuracy after the same number of epochs."""

    phase: str
    epochs: int
    params: int
    macs: int
    train_loss: float
    test_accuracy: float
    baseline_test_accuracy: float


def push_epoch(gpp, net, opt, data, batch: int, generator: torch.Generator) -> float:
    """One epoch of cross-entropy plus the push loss on the tapped layer; the mean training loss."""
    x, y = data
    net.train()
    total = 0.0
    for idx in torch.randperm(len(x), generator=generator).split(batch):
        opt.zero_grad()
        loss = F.cross_entropy(net(x[idx]), y[idx]) + gpp.push_loss(y[idx])
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
    return total / len(x)


def batches(task, n: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `n` training batches: the data of a discriminant prune step."""
    x, y = task.train
    return [(x[i:i + task.batch], y[i:i + task.batch]) for i in range(0, min(len(x), n * task.batch), task.batch)]


def schedule(task, net, gen: torch.Generator, *, target: float, step: float, push_weight: float, importance: str,
             grow: dict | None = None, push_config=None) -> tuple[float, int, int]:
    """GPP's schedule on a copy of the dense `net`, without output: with `grow`, a grow phase of E/2
    epochs; push phases of E/2 epochs (cross-entropy alone where push_weight is 0), each followed by
    a prune step ranked by `importance`, until `target`; a fine-tune of E epochs at lr/10.
    `push_config`: the push objective's options (dsd_fx.PushConfig; None: its defaults). Returns
    (test accuracy, parameters, epochs trained after the dense phase)."""
    import dsd_fx

    example = (task.test[0][:1],)
    gpp = dsd_fx.GPP(copy.deepcopy(net), sgd, lr=task.lr, example_args=example, target_params=target, step=step,
                     importance=importance, push_weight=push_weight, finetune_lr_scale=0.1, push_config=push_config)
    epochs, trained = max(1, task.epochs // 2), 0
    if grow:
        model, opt = gpp.begin("grow", **grow)
        for _ in range(epochs):
            train_epoch(model, opt, task.train, task.batch, gen)
        trained += epochs
    while not gpp.done:
        model, opt = gpp.begin("push")
        for _ in range(epochs):
            if push_weight:
                push_epoch(gpp, model, opt, task.train, task.batch, gen)
            else:
                train_epoch(model, opt, task.train, task.batch, gen)
        trained += epochs
        gpp.prune(data=batches(task))
    model, opt = gpp.begin("finetune")
    for _ in range(task.epochs):
        train_epoch(model, opt, task.train, task.batch, gen)
    return evaluate(model, task.test)[0], dsd_fx.cost(model, example).params, trained + task.epochs


def _phase(label: str, epochs: int, epoch, model, base: dict, task, gen_base: torch.Generator):
    """`epoch()` (one epoch of the GPP model) and one of the baseline, `epochs` times; the last figures."""
    bar = Progress(label, epochs)
    for _ in range(epochs):
        loss = epoch()
        acc, _ = evaluate(model, task.test)
        train_epoch(base["net"], base["opt"], task.train, task.batch, gen_base)
        b_acc, _ = evaluate(base["net"], task.test)
        bar.update(f"loss {loss:.4f} acc {acc:.3f} | baseline {b_acc:.3f}")
    return loss, acc, b_acc


def grow_options(args: argparse.Namespace) -> dict | None:
    """transform(phase="grow") options from --grow, --grow-width, --grow-how (None without --grow)."""
    if not args.grow:
        if args.grow_width is not None or args.grow_how is not None:
            raise DemoError("--grow-width and --grow-how go with --grow LAYERS (e.g. --grow conv2,conv3)")
        return None
    width = 0.5 if args.grow_width is None else args.grow_width
    if not width > 0 or (width >= 1 and width != int(width)):
        raise DemoError(f"--grow-width must be a fraction in (0, 1) or a whole number of channels, got {width}")
    return {"at": [a.strip() for a in args.grow.split(",") if a.strip()], "width": int(width) if width >= 1 else width,
            "how": args.grow_how or "inception"}


@dataclass
class GPPRun:
    """What the demo's GPP run leaves: its rows, the final model, the baseline, the model the prune
    steps started from (the grown one, or the baseline) and a copy of the dense phase's model."""

    rows: list[Row]
    final: torch.nn.Module
    baseline: torch.nn.Module
    unpruned: torch.nn.Module
    dense: torch.nn.Module


def train_gpp(task, target: float, step: float, grow: dict | None = None, importance: str = IMPORTANCE) -> GPPRun:
    """Dense E epochs; with `grow`, the grown model E/2 epochs; push E/2 epochs and a prune step until
    the params are at most `target` of the dense model; fine-tune E. Returns the rows, the final
    model, the baseline and the model the prune steps started from (the grown one, or the dense)."""
    import dsd_fx

    gens = {"gpp": torch.Generator().manual_seed(task.seed), "base": None}
    example = (task.test[0][:1],)
    net, opt, rows = task.net, sgd(task.net.parameters(), task.lr), []
    loss = 0.0
    bar = Progress("dense", task.epochs)
    for _ in range(task.epochs):
        loss = train_epoch(net, opt, task.train, task.batch, gens["gpp"])
        acc, _ = evaluate(net, task.test)
        bar.update(f"loss {loss:.4f} acc {acc:.3f}")
    start = dsd_fx.cost(net, example)
    rows.append(Row("dense", task.epochs, start.params, start.macs, loss, acc, acc))
    base = {"net": copy.deepcopy(net)}
    dense = copy.deepcopy(net)
    gens["base"] = torch.Generator().manual_seed(task.seed)
    gens["base"].set_state(gens["gpp"].get_state())
    try:
        gpp = dsd_fx.GPP(net, sgd, lr=task.lr, example_args=example, target_params=target, step=step,
                         importance=importance, push_weight=PUSH_WEIGHT, finetune_lr_scale=0.1)
    except (ValueError, TypeError) as err:
        raise DemoError(str(err)) from err
    push_epochs = max(1, task.epochs // 2)
    unpruned = base["net"]
    if grow:
        try:
            grown, opt = gpp.begin("grow", **grow)
        except (ValueError, TypeError) as err:
            raise DemoError(str(err)) from err
        base["opt"] = sgd(base["net"].parameters(), task.lr)
        loss, acc, b_acc = _phase("grow", push_epochs, lambda: train_epoch(grown, opt, task.train, task.batch, gens["gpp"]),
                                  grown, base, task, gens["base"])
        gpp.log(loss=loss, accuracy=acc)
        rows.append(Row(f"grow ({grow['how']})", push_epochs, gpp.now.params, gpp.now.macs, loss, acc, b_acc))
        unpruned = copy.deepcopy(grown)
    while not gpp.done:
        pushed, opt = gpp.begin("push")
        base["opt"] = sgd(base["net"].parameters(), task.lr)
        loss, acc, b_acc = _phase("push", push_epochs, lambda: push_epoch(gpp, pushed, opt, task.train, task.batch, gens["gpp"]),
                                  pushed, base, task, gens["base"])
        gpp.log(loss=loss, accuracy=acc)
        pruned = gpp.prune(data=batches(task))
        now = dsd_fx.cost(pruned, example)
        p_acc, _ = evaluate(pruned, task.test)
        rows.append(Row(f"push+prune {sum(r.phase.startswith('push') for r in rows) + 1}", push_epochs, now.params, now.macs, loss, p_acc, b_acc))
    final, opt = gpp.begin("finetune")
    base["opt"] = sgd(base["net"].parameters(), task.lr * 0.1)  # the same lr drop for the baseline
    loss, acc, b_acc = _phase("finetune", task.epochs, lambda: train_epoch(final, opt, task.train, task.batch, gens["gpp"]),
                              final, base, task, gens["base"])
    gpp.log(loss=loss, accuracy=acc)
    now = dsd_fx.cost(final, example)
    rows.append(Row("finetune", task.epochs, now.params, now.macs, loss, acc, b_acc))
    return GPPRun(rows, final, base["net"], unpruned, dense)


def compare(task, run: GPPRun, target: float, step: float, grow: dict | None) -> list[tuple[str, float, int]]:
    """Point 6's comparison for this one seed: the run above, its schedule without the push term,
    with L1 importance and no push (iterative L1 channel pruning), and the dense baseline:
    (method, test accuracy, parameters)."""
    import dsd_fx

    example = (task.test[0][:1],)
    out = [("gpp" + (" (grown first)" if grow else ""), evaluate(run.final, task.test)[0], dsd_fx.cost(run.final, example).params)]
    for name, weight, importance in (("no push", 0.0, IMPORTANCE), ("l1", 0.0, "l1")):
        bar = Progress(name, 1)
        acc, params, _ = schedule(task, run.dense, torch.Generator().manual_seed(task.seed), target=target, step=step,
                                  push_weight=weight, importance=importance, grow=grow)
        bar.update(f"acc {acc:.3f}")
        out.append((name + (" (grown first)" if grow else ""), acc, params))
    out.append(("dense baseline", evaluate(run.baseline, task.test)[0], dsd_fx.cost(run.baseline, example).params))
    return out


def comparison_table(found: list[tuple[str, float, int]], start_params: int) -> str:
    lines = ["comparison at the same budget (this seed only; benchmarks/gpp.py has 5 seeds and Torch-Pruning):",
             f"{'method':<26} {'test acc':>8} {'params':>9} {'of dense':>8}"]
    lines += [f"{name:<26} {acc:>8.3f} {params:>9,} {params / start_params:>8.1%}" for name, acc, params in found]
    return "\n".join(lines)


def table(rows: list[Row], start_params: int) -> str:
    lines = [f"{'phase':<16} {'epochs':>6} {'params':>9} {'of start':>8} {'MACs':>10} {'train loss':>10} "
             f"{'test acc':>8} {'baseline acc':>12}"]
    for r in rows:
        lines.append(f"{r.phase:<16} {r.epochs:>6} {r.params:>9,} {r.params / start_params:>8.1%} {r.macs:>10,} "
                     f"{r.train_loss:>10.4f} {r.test_accuracy:>8.3f} {r.baseline_test_accuracy:>12.3f}")
    last = rows[-1]
    lines.append(f"final: GPP {last.test_accuracy:.3f} at {last.params / start_params:.1%} of the parameters, dense "
                 f"baseline {last.baseline_test_accuracy:.3f}, difference {last.test_accuracy - last.baseline_test_accuracy:+.3f}")
    return "\n".join(lines)


def plot(rows: list[Row], path: str, title: str) -> None:
    fig, (ax,) = new_figure(1, 4.0)
    ax.plot([r.params for r in rows], [r.test_accuracy for r in rows], "o-", label="Grow-Push-Prune (after each phase)")
    ax.axhline(rows[-1].baseline_test_accuracy, color="tab:orange", linestyle="--", label="dense baseline, same epochs")
    for r in rows:
        ax.annotate(r.phase, (r.params, r.test_accuracy), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


TARGET, STEP = 0.5, 0.3  # the defaults of --target and --step


def run(args: argparse.Namespace) -> int:
    """The GPP demo; returns 0 if the pruned model's proof holds, 1 if not."""
    import dsd_fx

    # unset unless given (None): the DSD run refuses them, so their defaults are applied here
    args = argparse.Namespace(**{**vars(args), "target": TARGET if args.target is None else args.target,
                                 "step": STEP if args.step is None else args.step})
    if not 0 < args.target < 1 or not 0 < args.step < 1:
        raise DemoError(f"--target and --step must be fractions in (0, 1), got {args.target} and {args.step}")
    if args.sparsity is not None or args.pattern is not None:
        raise DemoError("--method gpp prunes whole channels; --sparsity and --pattern belong to the DSD run")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        started = time.perf_counter()
        out = check_out(args.out)
        grow = grow_options(args)
        task = load_task(args)
        if grow:  # a layer that cannot grow is said before any training: a trial on the untrained model
            try:
                dsd_fx.transform(task.net, phase="grow", example_args=(task.test[0][:1],), **grow)
            except (ValueError, TypeError) as err:
                raise DemoError(str(err)) from err
        grown = f"; grow {', '.join(grow['at'])} first ({grow['how']}, width {grow['width']})" if grow else ""
        print(f"dsd-fx demo --method gpp: {type(task.net).__name__} on {DATA_NAMES[task.data]}, target {args.target:.0%} "
              f"of the parameters, {args.step:.0%} of every channel group per prune step, seed {task.seed}{grown}; "
              "the dense baseline beside it", file=sys.stderr)
        result = train_gpp(task, args.target, args.step, grow)
        rows, final, unpruned = result.rows, result.final, result.unpruned
        found = compare(task, result, args.target, args.step, grow) if args.compare else []
        example = (task.test[0][:1],)
        dsd_fx.export_onnx(final, example, os.path.join(out, "model.onnx"))
        # the proof's reference: the model the prune steps started from (the grown one with --grow)
        dsd_fx.export_onnx(unpruned, example, os.path.join(out, "reference.onnx"))
        report = dsd_fx.verify_pruned(unpruned, final, example)
        with open(os.path.join(out, "pruned_proof.txt"), "w") as f:
            f.write(report.table + "\n")
        print(table(rows, rows[0].params))
        if found:
            print()
            print(comparison_table(found, rows[0].params))
        plot(rows, os.path.join(out, "gpp.png"), f"Grow-Push-Prune on {DATA_NAMES[task.data]}, {task.model.upper()}, seed {task.seed}")
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump({"target": args.target, "step": args.step, "grow": grow, "phases": [asdict(r) for r in rows],
                       "comparison": [{"method": n, "test_accuracy": a, "params": p} for n, a, p in found],
                       "pruned_proof": report.ok}, f, indent=1)
        print()
        print(report.table)
        print(f"\nwrote {', '.join(OUTPUTS)} to {out}")
        print(f"done in {time.perf_counter() - started:.1f} s")
        return 0 if report.ok else 1
    finally:
        torch.set_num_threads(threads)
