"""`dsd-fx demo`: Dense -> Sparse -> re-Dense beside a dense baseline on MNIST-1D, with the evidence.

It trains a small model (a CNN by default; `--model mlp` or `gru`) through the three phases with
`dsd_fx.DSD` and, beside it, the dense baseline: the same network from the end of the same dense
phase, trained on for the same epochs with the same learning-rate drop and never pruned. MNIST-1D
(`--data mnist1d`, the default) is generated on this machine from `--seed` by the `mnist1d`
package; `--data digits` takes scikit-learn's 8x8 digits instead. It prints one table (per phase,
both runs; the final test accuracies and their difference) and writes, under the output folder:

    model.onnx          the final D -> S -> D model, exported with the dynamo exporter
    reference.onnx      the dense baseline: the same architecture never sparsified, exported the same way
    zero_overhead.txt   the node-by-node comparison of the two, and onnxruntime vs torch
    training.png        train loss and test accuracy per epoch of both runs, phases shaded
    metrics.json        every number the table and the plot show
    diffs/NN_<phase>_<pass>/  per-pass graph diff: before.py, after.py, diff.txt, diff.dot, diff.png
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings

import torch

from dsd_fx.demo.models import RECIPES, sgd
from dsd_fx.demo.runs import PhaseRow, Runs, Task, train_both
OUTPUTS = ("model.onnx", "reference.onnx", "zero_overhead.txt", "training.png", "metrics.json")
DATA_NAMES = {"mnist1d": "MNIST-1D", "digits": "scikit-learn digits"}
# the keyword names of SparseConfig, DSD and the data loaders, as the demo's flags
FLAGS = {"sparsity": "--sparsity", "pattern": "--pattern", "method": "--method", "lr": "--lr", "seed": "--seed"}


class DemoError(Exception):
    """Bad input to the demo, found before any training."""


def flag_words(message: str) -> str:
    """A SparseConfig/DSD error in the demo's flag names: "sparsity must ..." -> "--sparsity must ...".

    Keyword forms become flags (``pattern='2:4'`` -> ``--pattern 2:4``); an option named as the
    subject of the message (at its start, or before "must") becomes its flag.
    """
    names = "|".join(FLAGS)
    message = re.sub(rf"\b({names})=(['\"]?)([^'\"\s,;)]*)\2", lambda m: f"{FLAGS[m[1]]} {m[3]}", message)
    return re.sub(rf"(?<![-\w])({names})\b(?=( must| '|\s*\[|$))|^({names})\b",
                  lambda m: FLAGS[m[1] or m[3]], message)


def sparse_options(args: argparse.Namespace) -> dict:
    """The sparse phase's options from the flags, checked by building the one `dsd_fx.SparseConfig`."""
    from dsd_fx import SparseConfig

    options = {k: getattr(args, k) for k in ("sparsity", "pattern", "method") if getattr(args, k) is not None}
    try:
        config = SparseConfig(**options)
    except (ValueError, TypeError) as err:
        raise DemoError(flag_words(str(err))) from err
    if config.pattern is None:
        options["sparsity"] = config.sparsity  # the config's default, so the table can show it
    return options


def describe(options: dict) -> str:
    if "pattern" in options:
        return f"{options['pattern']} {options.get('method', 'fixed')}"
    return f"{options['sparsity']:.0%} unstructured"


def load_task(args: argparse.Namespace) -> Task:
    """The dataset (generated from --seed), the initialised model, and the recipe's defaults for unset flags."""
    from dsd_fx.demo.data import LOADERS, MissingDataPackage

    recipe = RECIPES[(args.data, args.model)]
    if args.epochs is not None and args.epochs < 1:  # checked with --quick too, which would run 1 epoch
        raise DemoError(f"--epochs must be at least 1, got {args.epochs}")
    epochs = 1 if args.quick else (args.epochs if args.epochs is not None else recipe.epochs)
    lr = recipe.lr if args.lr is None else args.lr  # checked by dsd_fx.DSD
    batch = recipe.batch if args.batch is None else args.batch
    if batch < 1:
        raise DemoError(f"--batch must be at least 1, got {batch}")
    try:
        train, test = LOADERS[args.data](args.seed)
    except MissingDataPackage as err:
        raise DemoError(str(err)) from err
    except ValueError as err:
        raise DemoError(flag_words(str(err))) from err
    torch.manual_seed(args.seed)
    return Task(args.data, args.model, train, test, recipe.make(), epochs, lr, batch, args.seed)


def table(rows: list[PhaseRow]) -> str:
    """Per phase, both runs; then the final test accuracy of each and the difference."""
    head = (f"{'phase':<9} {'epochs':>6} {'lr':>7} {'sparsity':>8}  {'DSD train loss':>14} {'test acc':>8}  "
            f"{'baseline train loss':>19} {'test acc':>8} {'time':>7}")
    lines = [head]
    for r in rows:
        lines.append(f"{r.phase:<9} {r.epochs:>6} {r.lr:>7.4g} {r.sparsity:>8.1%}  {r.train_loss:>14.4f} "
                     f"{r.test_accuracy:>8.3f}  {r.baseline_train_loss:>19.4f} {r.baseline_test_accuracy:>8.3f} "
                     f"{r.seconds:>6.1f}s")
    last = rows[-1]
    lines.append(f"final test accuracy: D -> S -> D {last.test_accuracy:.3f}, dense baseline "
                 f"{last.baseline_test_accuracy:.3f}, difference {last.test_accuracy - last.baseline_test_accuracy:+.3f}")
    return "\n".join(lines)


def prove(out: str, final: torch.nn.Module, baseline: torch.nn.Module, example: tuple):
    """Export both runs' final models and compare them: the zero-overhead proof, also written to a file."""
    import dsd_fx

    dsd_fx.export_onnx(final, example, os.path.join(out, "model.onnx"))
    dsd_fx.export_onnx(baseline, example, os.path.join(out, "reference.onnx"))
    report = dsd_fx.verify_zero_overhead(baseline, final, example)
    with open(os.path.join(out, "zero_overhead.txt"), "w") as f:
        f.write(report.table + "\n")
    return report


def write_metrics(path: str, task: Task, options: dict, runs: Runs, dsd, ok: bool) -> None:
    last = runs.rows[-1]
    final = {"dsd_test_accuracy": last.test_accuracy, "baseline_test_accuracy": last.baseline_test_accuracy,
             "difference": last.test_accuracy - last.baseline_test_accuracy}
    settings = {"data": task.data, "model": task.model, "epochs": task.epochs, "lr": task.lr, "batch": task.batch,
                "seed": task.seed, "sparse": options}
    with open(path, "w") as f:
        json.dump({"args": settings, "phases": [r.__dict__ for r in runs.rows], "curves": runs.curves,
                   "final": final, "sad": [{"phase": h.name, "sad": h.sad} for h in dsd.history if h.sad],
                   "zero_overhead": ok}, f, indent=1)


def check_out(folder: str) -> str:
    folder = os.path.abspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dsd_fx-probe-"):
            pass
    except OSError as err:
        raise DemoError(f"cannot write to output folder {folder}: {err.strerror}; pass --out with a writable folder") from err
    return folder


def start(args: argparse.Namespace):
    """Every check before any training: the flags, matplotlib, the output folder, the data, the DSD helper."""
    import dsd_fx

    options = sparse_options(args)
    try:
        import matplotlib  # noqa: F401 - needed for the plot at the end: fail now, not after training
    except ImportError as err:
        raise DemoError("the demo's plot needs matplotlib: pip install 'dsd-fx[demo]'") from err
    out = check_out(args.out)
    task = load_task(args)
    diffs = os.path.join(out, "diffs")
    shutil.rmtree(diffs, ignore_errors=True)  # per-pass folders are numbered: start afresh
    steps_per_epoch = -(-len(task.train[0]) // task.batch)
    try:
        dsd = dsd_fx.DSD(task.net, sgd, lr=task.lr, redense_lr_scale=0.1, print_changed_dir=diffs,
                         sad_every=steps_per_epoch, **options)  # SAD once per epoch (SR-STE / STE)
        with warnings.catch_warnings():  # a dry run on a copy: a pattern no layer can take fails now, not
            warnings.simplefilter("ignore")  # after the dense phase; its warnings come with the real run
            dsd_fx.transform(task.net, phase="sparse", copy=True, **options)
    except (ValueError, TypeError) as err:
        raise DemoError(flag_words(str(err))) from err
    return out, task, options, dsd


def run(args: argparse.Namespace) -> int:
    """The demo; returns 0 if the zero-overhead proof holds, 1 if not."""
    threads = torch.get_num_threads()
    if args.threads < 1:
        raise DemoError(f"--threads must be at least 1, got {args.threads}")
    lm_only = [flag for flag, given in (("--steps", args.steps is not None), ("--criterion", args.criterion != "magnitude"))
               if given]
    if lm_only:
        raise DemoError(f"{', '.join(lm_only)} belong to --task lm; the classifiers train by --epochs with magnitude masks")
    gpp_only = [flag for flag, given in (("--target", args.target is not None), ("--step", args.step is not None),
                                         ("--grow", args.grow is not None), ("--grow-width", args.grow_width is not None),
                                         ("--grow-how", args.grow_how is not None), ("--no-compare", not args.compare)) if given]
    if gpp_only:
        raise DemoError(f"{', '.join(gpp_only)} belong to --method gpp (Grow-Push-Prune); the DSD run takes none of them")
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # the caller's setting back (cli.main may run inside a test process)


def _run(args: argparse.Namespace) -> int:
    from dsd_fx.demo.plot import plot_training

    started = time.perf_counter()
    out, task, options, dsd = start(args)
    print(f"dsd-fx demo: {type(task.net).__name__} on {DATA_NAMES[task.data]} ({len(task.train[0])} train / "
          f"{len(task.test[0])} test), {task.epochs} epochs per phase, sparse phase {describe(options)}, "
          f"lr {task.lr:g} (re-dense {task.lr * 0.1:g}), seed {task.seed}; the dense baseline beside it",
          file=sys.stderr)
    runs = train_both(dsd, task)
    print(table(runs.rows))
    report = prove(out, runs.final, runs.baseline, (task.test[0][:1],))
    first_sparse = next(first for name, first, _ in runs.bounds if name == "sparse")
    sad = [(first_sparse + k, f) for h in dsd.history if h.sad for k, (_, f) in enumerate(h.sad)]
    title = f"DSD vs dense on {DATA_NAMES[task.data]}, {task.model.upper()}: {describe(options)}, seed {task.seed}"
    plot_training(runs.curves, runs.bounds, os.path.join(out, "training.png"), title, sad)
    write_metrics(os.path.join(out, "metrics.json"), task, options, runs, dsd, report.ok)
    print()
    print(report.table)
    print(f"\nwrote {', '.join(OUTPUTS)} and diffs/ (one folder per changed pass) to {out}")
    print(f"done in {time.perf_counter() - started:.1f} s (data, both trainings, export, proof and pictures)")
    print(f"check the files yourself: dsd-fx check {os.path.join(out, 'reference.onnx')} {os.path.join(out, 'model.onnx')}")
    return 0 if report.ok else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="classify", choices=["classify", "lm"],
                   help="classify: the MNIST-1D (or digits) classifiers (default); lm: a byte-level LLaMA "
                        "(transformers) on the Python standard library's sources, by steps (see --steps)")
    p.add_argument("--steps", type=int, help="with --task lm: training steps per phase (default 400; --quick 60)")
    p.add_argument("--criterion", default="magnitude", choices=["magnitude", "wanda"],
                   help="with --task lm: what ranks the weights pruned: magnitude (DSD's, default) or wanda "
                        "(|W| times the input's norm over 4 training batches)")
    p.add_argument("--data", default="mnist1d", choices=["mnist1d", "digits"],
                   help="mnist1d (generated from --seed, default) or digits (scikit-learn's 8x8 images)")
    p.add_argument("--model", default="cnn", choices=["cnn", "mlp", "gru"], help="the network (default cnn)")
    p.add_argument("--epochs", type=int, help="epochs per phase (default: the model's recipe, 20 for the MNIST-1D "
                                              "CNN and MLP, 10 for the GRU and on digits)")
    p.add_argument("--quick", action="store_true", help="1 epoch per phase (--task lm: 60 steps): every output in "
                                                        "seconds (a smoke test)")
    p.add_argument("--sparsity", type=float, help="fraction pruned in the sparse phase (default 0.5)")
    p.add_argument("--pattern", help="N:M pattern instead of a fraction, e.g. 2:4")
    p.add_argument("--method", choices=["fixed", "sr-ste", "ste", "gpp"],
                   help="N:M method (default fixed), or gpp: Grow-Push-Prune's push and prune iterations instead of DSD")
    p.add_argument("--target", type=float, help="with --method gpp: the parameter budget, a fraction of the start (default 0.5)")
    p.add_argument("--step", type=float, help="with --method gpp: the fraction of every channel group each prune step removes (default 0.3)")
    p.add_argument("--grow", help="with --method gpp: grow these layers first (comma-separated, e.g. conv2,conv3 on the "
                                  "MNIST-1D CNN) and train the grown model before pushing and pruning it")
    p.add_argument("--grow-width", type=float, help="with --grow: channels added per layer, a count (>= 1) "
                                                    "or a fraction of its channels (default 0.5)")
    p.add_argument("--no-compare", dest="compare", action="store_false",
                   help="with --method gpp: skip the comparison runs (no push, L1) after the GPP run")
    p.add_argument("--grow-how", choices=["inception", "zeros", "net2net"],
                   help="with --grow: an Inception module beside each layer (default), or wider layers")
    p.add_argument("--lr", type=float, help="dense learning rate; re-dense and the baseline's last phase use a "
                                            "tenth (default: the recipe's, 0.1 for the MNIST-1D CNN, 3e-3 for the LM)")
    p.add_argument("--batch", type=int, help="batch size (default 100 on MNIST-1D, 64 on digits, 32 windows for the LM)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the data, the init and the batches (default 0): the same seed gives the same numbers")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: these models are too small to gain from more, and on a "
                        "busy machine more threads are many times slower)")
    p.add_argument("--out", default="dsd_fx_out", help="output folder (default dsd_fx_out)")
