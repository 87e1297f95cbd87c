"""The byte-level LLaMA of `dsd-fx demo --task lm`: one-shot Wanda vs magnitude, and DSD vs dense at equal steps.

    python benchmarks/lm.py --part oneshot --seeds 3 --out benchmarks/results_lm_oneshot.txt
    python benchmarks/lm.py --part dsd --seeds 2 --sparsities 0.3,0.5 --redense 0.1,1 --out benchmarks/results_lm_dsd.txt
    python benchmarks/lm.py --part fit --steps 1200 --optimizer adamw,sgd --lr 3e-3,0.3   # dense only: does it overfit?
    python benchmarks/lm.py --quick            # a smoke test of oneshot and dsd

Same corpus (the Python standard library's sources on this machine, `dsd_fx.demo.text_data`; another
Python version has another library, so other figures), same model and recipe as the demo
(`dsd_fx.demo.lm.RECIPE`: 2 layers, hidden 64, AdamW 3e-3, batches of 32 x 64 bytes).

oneshot: per seed, the demo's dense phase (--steps steps), then the trained model pruned without
  retraining, 50% unstructured and 2:4, by magnitude and by Wanda (calibration: --calibration
  batches of training windows; the attention and MLP Linear weights, not the LM head, as the Wanda
  paper prunes), validation bits per byte right after pruning and after --finetune steps of the
  sparse phase (masks held). Paired differences Wanda - magnitude per seed.
dsd: per seed and setting, `dsd_fx.demo.runs.run_both` as the demo runs it (D -> S -> D beside the
  dense baseline forked at the end of D, equal steps, the same learning rates: re-dense and the
  baseline's last phase at lr * the --redense scale): validation bits per byte at the end and the
  best point after the fork, both runs, and DSD - dense paired by seed.
fit: per optimizer (AdamW, or SGD with momentum 0.9, at the matching --lr), the dense model alone
  for --steps steps: train bits per byte (mean of each round's steps) and validation bits per byte
  after every round of 50 steps, seed 0: where validation is lowest, and whether it rises after.
Writes --out (the printed table) if given.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from dataclasses import replace

import torch

import dsd_fx
from dsd_fx.demo.lm import QUICK, RECIPE, LN2, LMRecipe, adamw, lm_loop, make_llama, validation_loss
from dsd_fx.demo.runs import run_both
from dsd_fx.demo.text_data import TextCorpus, load_stdlib_corpus

ONESHOT = {"50% unstructured": {"sparsity": 0.5}, "2:4": {"pattern": "2:4"}}


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def train_dense(recipe: LMRecipe, corpus: TextCorpus, seed: int) -> torch.nn.Module:
    model = make_llama(recipe, seed)
    loop = lm_loop(corpus, recipe, seed)
    opt, gen = adamw(model.parameters(), recipe.lr), torch.Generator().manual_seed(seed)
    for _ in range(loop.rounds):
        loop.train_round(model, opt, gen, None)
    return model


def oneshot(recipe: LMRecipe, corpus: TextCorpus, seeds: int, calibration: int, finetune: int) -> list[str]:
    val_x, val_y = TextCorpus.windows(corpus.val, recipe.length)
    val_x, val_y = val_x[: recipe.val_windows], val_y[: recipe.val_windows]
    results: dict[tuple[str, str, str], list[float]] = {}
    dense = []
    for seed in range(seeds):
        t0 = time.perf_counter()
        model = train_dense(recipe, corpus, seed)
        dense.append(validation_loss(model, val_x, val_y, recipe.batch) / LN2)
        gen = torch.Generator().manual_seed(10_000 + seed)
        data = [TextCorpus.batch(corpus.train, recipe.batch, recipe.length, gen)[0] for _ in range(calibration)]
        example = (val_x[:2],)
        for name, options in ONESHOT.items():
            for criterion in ("magnitude", "wanda"):
                extra = {"criterion": "wanda", "data": data} if criterion == "wanda" else {}
                sparse = dsd_fx.transform(model, phase="sparse", copy=True, capture="export", example_args=example,
                                          exclude=["lm_head"], **options, **extra)
                results.setdefault((name, criterion, "pruned"), []).append(validation_loss(sparse, val_x, val_y, recipe.batch) / LN2)
                if finetune:
                    loop = lm_loop(corpus, replace(recipe, round_steps=finetune), seed)
                    loop.train_round(sparse, adamw(sparse.parameters(), recipe.lr), torch.Generator().manual_seed(seed), None)
                    results.setdefault((name, criterion, "tuned"), []).append(validation_loss(sparse, val_x, val_y, recipe.batch) / LN2)
        print(f"seed {seed}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    lines = [f"one-shot pruning of the trained dense model ({recipe.steps} steps), validation bits per byte, "
             f"mean ± std over {seeds} seeds; calibration {calibration} x {recipe.batch} x {recipe.length} bytes; "
             f"lm_head and embeddings dense",
             f"dense, before pruning: {mean_std(dense)}",
             f"{'pattern':<18} {'criterion':<10} {'after pruning':>15} " + (f"{f'after {finetune} steps':>16}" if finetune else "")]
    for name in ONESHOT:
        for criterion in ("magnitude", "wanda"):
            row = f"{name:<18} {criterion:<10} {mean_std(results[(name, criterion, 'pruned')]):>15} "
            lines.append(row + (f"{mean_std(results[(name, criterion, 'tuned')]):>16}" if finetune else ""))
    lines.append("paired difference wanda - magnitude (negative: Wanda better):")
    for name in ONESHOT:
        for when in ("pruned", "tuned") if finetune else ("pruned",):
            diff = [w - m for w, m in zip(results[(name, "wanda", when)], results[(name, "magnitude", when)])]
            lines.append(f"  {name:<18} {'right after pruning' if when == 'pruned' else f'after {finetune} steps':<20} "
                         f"{mean_std(diff)}  (per seed: {', '.join(f'{d:+.3f}' for d in diff)})")
    return lines


def dsd_grid(recipe: LMRecipe, corpus: TextCorpus, seeds: int, sparsities: list[float], redense: list[float]) -> list[str]:
    lines = [f"DSD vs the dense baseline at equal steps ({recipe.steps} per phase), validation bits per byte, "
             f"mean ± std over {seeds} seeds; difference DSD - dense paired by seed (negative: DSD better)",
             f"{'sparsity':>8} {'re-dense':>8}  {'DSD end':>13} {'dense end':>13} {'diff end':>15}  "
             f"{'DSD best':>13} {'dense best':>13} {'diff best':>15}  {'dense-phase best':>16}"]
    for sparsity in sparsities:
        for scale in redense:
            runs = []
            for seed in range(seeds):
                model = make_llama(recipe, seed)
                example = TextCorpus.windows(corpus.val, recipe.length)[0][:2]
                dsd = dsd_fx.DSD(model, adamw, lr=recipe.lr, redense_lr_scale=scale, sparsity=sparsity,
                                 capture="export", example_args=(example,))
                _, curves, _, _, _ = run_both(dsd, lm_loop(corpus, recipe, seed))
                after = [i for i, r in enumerate(curves["dsd"]) if r["phase"] != "dense"]
                runs.append((curves["dsd"][-1]["bpb"], curves["baseline"][-1]["bpb"],
                             min(curves["dsd"][i]["bpb"] for i in after), min(curves["baseline"][i]["bpb"] for i in after),
                             min(r["bpb"] for r in curves["dsd"] if r["phase"] == "dense")))
            col = list(zip(*runs))
            rel_end = [(d - b) / b for d, b in zip(col[0], col[1])]
            lines.append(f"{sparsity:>8.0%} {scale:>8g}  {mean_std(col[0]):>13} {mean_std(col[1]):>13} "
                         f"{mean_std([d - b for d, b in zip(col[0], col[1])]):>15}  {mean_std(col[2]):>13} {mean_std(col[3]):>13} "
                         f"{mean_std([d - b for d, b in zip(col[2], col[3])]):>15}  {mean_std(col[4]):>16}"
                         f"   (end: {statistics.mean(rel_end):+.1%}; per seed {', '.join(f'{d - b:+.3f}' for d, b in zip(col[0], col[1]))})")
    return lines


def fit(recipe: LMRecipe, corpus: TextCorpus, optimizers: list[str], lrs: list[float]) -> list[str]:
    lines = [f"dense training alone, seed 0, {recipe.steps} steps: train / validation bits per byte every {recipe.round_steps} steps"]
    for name, lr in zip(optimizers, lrs):
        make = adamw if name == "adamw" else (lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9))
        model, loop = make_llama(recipe, 0), lm_loop(corpus, recipe, 0)
        opt, gen = make(model.parameters(), lr), torch.Generator().manual_seed(0)
        points = []
        for r in range(loop.rounds):
            train = loop.train_round(model, opt, gen, None) / LN2
            points.append(((r + 1) * recipe.round_steps, train, loop.evaluate(model)["bpb"]))
        best = min(points, key=lambda p: p[2])
        lines.append(f"{name} lr {lr:g}: lowest validation {best[2]:.3f} at step {best[0]}; end: train {points[-1][1]:.3f}, "
                     f"validation {points[-1][2]:.3f}")
        lines.append("  " + ", ".join(f"{step}: {t:.2f}/{v:.3f}" for step, t, v in points))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["oneshot", "dsd", "both", "fit"], default="both")
    p.add_argument("--optimizer", default="adamw,sgd", help="with --part fit: adamw and/or sgd (momentum 0.9)")
    p.add_argument("--lr", default="3e-3,0.3", help="with --part fit: one learning rate per optimizer")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, help=f"steps per phase (default the demo's, {RECIPE.steps})")
    p.add_argument("--calibration", type=int, default=8, help="calibration batches for Wanda (default 8)")
    p.add_argument("--finetune", type=int, default=100, help="steps of the sparse phase after one-shot pruning (0: none)")
    p.add_argument("--sparsities", default="0.3,0.5")
    p.add_argument("--redense", default="0.1,1", help="re-dense learning-rate scales (default 0.1,1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*skips.*")
    recipe = QUICK if args.quick else RECIPE
    if args.steps is not None:
        recipe = replace(recipe, steps=args.steps)
    seeds = 1 if args.quick else args.seeds
    corpus = load_stdlib_corpus(recipe.train_bytes, recipe.val_bytes)
    started = time.perf_counter()
    lines = [f"benchmarks/lm.py {' '.join(argv if argv is not None else sys.argv[1:])}", corpus.describe(),
             f"torch {torch.__version__}, {args.threads} thread(s)", ""]
    if args.part == "fit":
        lines += fit(recipe, corpus, args.optimizer.split(","), [float(v) for v in args.lr.split(",")]) + [""]
    if args.part in ("oneshot", "both"):
        lines += oneshot(recipe, corpus, seeds, 2 if args.quick else args.calibration, 20 if args.quick else args.finetune) + [""]
    if args.part in ("dsd", "both"):
        lines += dsd_grid(recipe, corpus, seeds, [float(s) for s in args.sparsities.split(",")],
                          [float(s) for s in args.redense.split(",")]) + [""]
    lines.append(f"done in {time.perf_counter() - started:.0f} s")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
