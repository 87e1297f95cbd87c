"""Grow-Push-Prune against its ablations and against Torch-Pruning, at equal parameter budgets.

    python benchmarks/gpp.py                     # CNN and MLP on MNIST-1D, CNN on digits; budgets 0.5 and 0.25; 5 seeds
    python benchmarks/gpp.py --seeds 3 --epochs 6 --out benchmarks/results_gpp.txt
    python benchmarks/gpp.py --quick             # a smoke test
    python benchmarks/gpp.py --models mnist1d:cnn --targets 0.25 --seeds 3 --methods gpp,"no push",l1 \
        --push-weight 0.03,0.1,0.3 --criterion log_det --ridge 0.1   # a push sweep: one gpp row per weight
    python benchmarks/gpp.py --diagnose --models mnist1d:cnn --seeds 3 --out /tmp/diagnose.txt
                                                 # the push objective at the dense solution, per setting

Per model and seed: one dense phase of E epochs, shared by every method (copied), then, to the
budget (a fraction of the dense model's parameters):
  gpp            push phases (cross-entropy + dsd_fx.push_loss on the classifier's input, E/2 epochs)
                 each followed by a prune step of --step of every channel group ranked by --importance,
                 until the budget; a fine-tune of E epochs at lr/10
  grow+gpp       GROW's growth first (Inception modules beside the CNNs' convolutions, a wider MLP
                 layer), E/2 epochs of training, then gpp's schedule to the same budget (a fraction
                 of the dense model before growth)
  no push        the same schedule with the push term off (importance alone)
  l1             the same schedule, no push, L1 magnitude importance (iterative L1 channel pruning)
  torch-pruning  Torch-Pruning's MagnitudePruner (L1), one shot, at the channel ratio (bisected) that
                 reaches the budget, then as many epochs of fine-tuning as the gpp run trained after
                 its dense phase
  dense          never pruned, trained for as many epochs as the gpp run (the unpruned reference)
--push-weight w1,w2,... runs gpp once per weight (rows "gpp w=..."; one weight: the row "gpp"); the
push term is w * dsd_fx.push_loss(model, labels, config=PushConfig(--criterion, --ridge,
--decorrelation)), defaults PushConfig's. --methods runs only some methods.
Reported: test accuracy mean +- std over seeds, the parameter fraction reached, and the
differences to gpp, to "no push" and to l1, paired by seed (where those ran). Writes --out
(default benchmarks/results_gpp.txt).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import dsd_fx
from dsd_fx.demo.dsd import load_task
from dsd_fx.demo.gpp import schedule
from dsd_fx.demo.models import evaluate, sgd, train_epoch
from dsd_fx.push.objective import PushConfig, push_objective
from dsd_fx.taps import recorder_of

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("gpp", "grow+gpp", "no push", "l1", "torch-pruning", "dense")
# what "grow+gpp" grows first, per data:model (transform(phase="grow") options): Inception modules
# beside the CNNs' convolutions that keep their grid, a wider hidden layer for the MLP
GROW = {"mnist1d:cnn": {"at": ["conv2", "conv3"], "width": 0.5, "how": "inception"},
        "digits:cnn": {"at": ["conv1", "conv2"], "width": 0.5, "how": "inception"},
        "mnist1d:mlp": {"at": ["fc1"], "width": 0.5, "how": "zeros"}}


def _task(data: str, model: str, seed: int, epochs: int | None):
    args = argparse.Namespace(data=data, model=model, epochs=epochs, quick=False, lr=None, batch=None, seed=seed)
    return load_task(args)


def _schedule(task, net, gen, target, step, push_weight, importance, config=None, grow=None):
    """GPP's schedule on a copy of the dense net (demo_gpp.schedule, the demo's comparison runs):
    (accuracy, params, epochs trained after the dense phase)."""
    return schedule(task, net, gen, target=target, step=step, push_weight=push_weight, importance=importance,
                    grow=grow, push_config=config)


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
    config = PushConfig(**args.push_options)
    for target in targets:
        fork = lambda: torch.Generator().manual_seed(seed * 1000 + int(target * 100))  # noqa: E731 - same batches per method
        epochs = None
        for w in args.push_weights:
            name = _gpp_name(w, args.push_weights)
            if name in args.methods:
                acc, params, epochs = _schedule(task, net, fork(), target, args.step, w, args.importance, config)
                out[(target, name)] = (acc, params / start)
        if "grow+gpp" in args.methods:
            acc, params, _ = _schedule(task, net, fork(), target, args.step, args.push_weights[0], args.importance, config,
                                       grow=GROW[f"{data}:{model_name}"])
            out[(target, "grow+gpp")] = (acc, params / start)
        if "no push" in args.methods:
            acc, params, epochs = _schedule(task, net, fork(), target, args.step, 0.0, args.importance)
            out[(target, "no push")] = (acc, params / start)
        if "l1" in args.methods:
            acc, params, epochs = _schedule(task, net, fork(), target, args.step, 0.0, "l1")
            out[(target, "l1")] = (acc, params / start)
        if epochs is None and {"torch-pruning", "dense"} & set(args.methods):  # their epochs: the schedule's
            _, _, epochs = _schedule(task, net, fork(), target, args.step, 0.0, "l1")
        if "torch-pruning" in args.methods:
            acc, params = _torch_pruning(task, net, fork(), target, epochs)
            out[(target, "torch-pruning")] = (acc, params / start)
        if "dense" in args.methods:
            acc, params = _dense(task, net, fork(), epochs)
            out[(target, "dense")] = (acc, params / start)
    return out


def _gpp_name(weight: float, weights) -> str:
    return "gpp" if len(weights) == 1 else f"gpp w={weight:g}"


DIAGNOSED = {  # label: PushConfig options; None: the correlation penalty alone (default ridge)
    "log_det ridge 1e-3 (former default)": {"ridge": 1e-3}, "log_det ridge 1e-3, decorrelation 0": {"ridge": 1e-3, "decorrelation": 0.0},
    "correlation penalty alone": None, "log_det ridge 0.03": {"ridge": 0.03}, "log_det ridge 0.1 (default)": {},
    "log_det ridge 1": {"ridge": 1.0}, "deeplda ridge 1e-3, decorrelation 0": {"criterion": "deeplda", "ridge": 1e-3, "decorrelation": 0.0},
    "deeplda ridge 1, decorrelation 0": {"criterion": "deeplda", "ridge": 1.0, "decorrelation": 0.0},
}


def diagnose(data: str, model_name: str, seed: int, epochs: int | None, batches: int = 5) -> list[str]:
    """At the dense solution (the shared dense phase), per push setting: the objective on training
    batches and on the whole test set, and its parameter gradient's norm and cosine against
    cross-entropy's, averaged over `batches` training batches."""
    task = _task(data, model_name, seed, epochs)
    gen = torch.Generator().manual_seed(seed)
    net = task.net
    opt = sgd(net.parameters(), task.lr)
    for _ in range(task.epochs):
        train_epoch(net, opt, task.train, task.batch, gen)
    gm = dsd_fx.transform(copy.deepcopy(net), phase="push")
    params = list(gm.parameters())

    def grad(loss):
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)])

    def objective(feat, y, options):
        if options is None:
            return push_objective(feat, y) - push_objective(feat, y, decorrelation=0.0)
        return push_objective(feat, y, **options)

    gm.eval()
    with torch.no_grad():
        gm(task.test[0])
        test_feat = next(iter(recorder_of(gm).activations.values())).clone()
    gm.train()
    sums = {k: [0.0] * 4 for k in DIAGNOSED}
    x, y = task.train
    for b in range(batches):
        xb, yb = x[b * task.batch:(b + 1) * task.batch], y[b * task.batch:(b + 1) * task.batch]
        out = gm(xb)
        feat = next(iter(recorder_of(gm).activations.values()))
        g_ce = grad(F.cross_entropy(out, yb))
        for k, options in DIAGNOSED.items():
            loss = objective(feat, yb, options)
            g = grad(loss)
            for i, v in enumerate((loss.item(), objective(test_feat, task.test[1], options).item(),
                                   (g.norm() / g_ce.norm()).item(), F.cosine_similarity(g, g_ce, 0).item())):
                sums[k][i] += v / batches
    lines = [f"## push objective at the dense solution: {model_name} on {data}, seed {seed}, tap of {test_feat.shape[1]} "
             f"features, batches of {task.batch}, {batches} batches",
             f"{'setting':<40} {'on a batch':>10} {'on the test set':>15} {'|grad| / |grad CE|':>19} {'cos(grad, grad CE)':>18}"]
    for k, (value, test, ratio, cos) in sums.items():
        lines.append(f"{k:<40} {value:>10.3f} {test:>15.3f} {ratio:>19.2f} {cos:>18.3f}")
    return lines + [""]


def _stat(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def report(name, per_seed, targets, methods) -> list[str]:
    refs = [m for m in ("gpp", "no push", "l1") if m in methods]
    lines = [f"## {name}", f"{'budget':>6} {'method':<14} {'test accuracy':>18} {'params':>14}"
             + "".join(f" {'acc - ' + r + ' (paired)':>22}" for r in refs)]
    for target in targets:
        for method in methods:
            acc = [s[(target, method)][0] for s in per_seed]
            frac = [s[(target, method)][1] for s in per_seed]
            (a, sa), (f, sf) = _stat(acc), _stat(frac)
            line = f"{target:>6.2f} {method:<14} {a:.4f} +- {sa:.4f} {f:>7.3f} +- {sf:.3f}"
            for ref in refs:
                d, sd = _stat([s[(target, method)][0] - s[(target, ref)][0] for s in per_seed])
                line += f" {'' if method == ref else f'{d:+.4f} +- {sd:.4f}':>22}"
            lines.append(line)
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, help="E, epochs of the dense phase and of the fine-tune (default: the recipe's)")
    p.add_argument("--targets", default="0.5,0.25", help="parameter budgets, fractions of the dense model (default 0.5,0.25)")
    p.add_argument("--step", type=float, default=0.3, help="fraction of every channel group per prune step (default 0.3)")
    p.add_argument("--importance", default="discriminant", help="gpp's importance: discriminant (default) or l1")
    p.add_argument("--models", default="mnist1d:cnn,mnist1d:mlp,digits:cnn", help="data:model pairs")
    p.add_argument("--methods", default=",".join(METHODS), help=f"methods to run (default all: {','.join(METHODS)})")
    p.add_argument("--push-weight", default="1.0", help="gpp's push weight(s), comma-separated: one gpp run per weight (default 1.0)")
    p.add_argument("--criterion", help="PushConfig.criterion (default PushConfig's)")
    p.add_argument("--ridge", type=float, help="PushConfig.ridge (default PushConfig's)")
    p.add_argument("--decorrelation", type=float, help="PushConfig.decorrelation (default PushConfig's)")
    p.add_argument("--quick", action="store_true", help="2 seeds, 2 epochs, MNIST-1D CNN, budget 0.5")
    p.add_argument("--out", default=os.path.join(HERE, "results_gpp.txt"))
    p.add_argument("--json", help="also write every seed's (accuracy, params fraction) per model, budget and method here")
    p.add_argument("--diagnose", action="store_true", help="only measure the push objective at each seed's dense solution "
                   "(batch vs test-set value, gradient against cross-entropy's) for the settings in DIAGNOSED")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.models, args.targets = 2, 2, "mnist1d:cnn", "0.5"
    targets = [float(t) for t in args.targets.split(",")]
    args.push_weights = [float(w) for w in args.push_weight.split(",")]
    if any(w <= 0 for w in args.push_weights):
        p.error("--push-weight: weights must be > 0 (the push-free run is the method 'no push')")
    gpp_rows = [_gpp_name(w, args.push_weights) for w in args.push_weights]
    wanted = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown[0]!r}; the methods are {', '.join(METHODS)}")
    args.methods = [r for m in METHODS if m in wanted for r in (gpp_rows if m == "gpp" else [m])]
    args.push_options = {k: getattr(args, k) for k in ("criterion", "ridge", "decorrelation") if getattr(args, k) is not None}
    config = PushConfig(**args.push_options)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    t0 = time.perf_counter()
    lines = [f"# benchmarks/gpp.py {' '.join(sys.argv[1:]) or '(defaults)'}: {args.seeds} seeds, step {args.step}, importance "
             f"{args.importance}, push weight {args.push_weight}, {config}, torch {torch.__version__}, 1 thread", ""]
    if args.diagnose:
        for pair in args.models.split(","):
            for seed in range(args.seeds):
                lines += diagnose(*pair.split(":"), seed, args.epochs)
                print("\n".join(lines[-(len(DIAGNOSED) + 3):]), flush=True)
        lines.append(f"# {time.perf_counter() - t0:.0f} s")
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        return
    raw = {}
    for pair in args.models.split(","):
        data, model_name = pair.split(":")
        per_seed = [one_seed(data, model_name, seed, targets, args) for seed in range(args.seeds)]
        raw[pair] = [{f"{t} {m}": v for (t, m), v in s.items()} for s in per_seed]
        lines += report(f"{model_name} on {data}", per_seed, targets, args.methods)
        print("\n".join(lines[-(len(targets) * len(args.methods) + 3):]), flush=True)
    lines.append(f"# {time.perf_counter() - t0:.0f} s")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": sys.argv[1:], "per_seed": raw}, f, indent=1)
    print(lines[-1])


if __name__ == "__main__":
    main()
