"""`dsd-fx demo --task lm`: Dense -> Sparse -> re-Dense beside a dense baseline on a byte-level LLaMA.

The model is transformers' `LlamaForCausalLM` (grouped KV heads, SwiGLU, RMSNorm, rotary positions)
made small from a `LlamaConfig` with a vocabulary of the 256 byte values; the text is the Python
standard library's own `.py` sources on this machine (`dsd_fx.demo.text_data`: train and validation
split by file, nothing downloaded). The dense phase trains the model itself; the sparse phase
captures it with torch.export (`capture="export"`: transformers 5's models are beyond torch.fx) and
masks its Linear weights; re-dense gives back the exported graph, which is proved against the dense
baseline (the model never sparsified, exported the same way). Both runs see the same batches and the
same learning rates, AdamW in every phase, fresh per phase. It prints one table (train loss,
validation loss and bits per byte per phase, both runs) and writes, under the output folder:

    model.onnx          the final D -> S -> D model
    reference.onnx      the dense baseline: the same LLaMA never sparsified
    zero_overhead.txt   the node-by-node comparison of the two, and onnxruntime vs torch
    training.png        train and validation bits per byte of both runs, phases shaded
    metrics.json        every number the table and the plot show
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from dsd_fx.infra.calls import eval_mode
from dsd_fx.demo.dsd import DemoError, check_out, describe, flag_words, prove, sparse_options
from dsd_fx.demo.runs import Loop, PhaseSummary, run_both
from dsd_fx.demo.text_data import VOCAB, TextCorpus, load_stdlib_corpus

OUTPUTS = ("model.onnx", "reference.onnx", "zero_overhead.txt", "training.png", "metrics.json")
LN2 = math.log(2)


@dataclass(frozen=True)
class LMRecipe:
    """The model's size, the corpus caps and the training budget of the demo (`--quick`: its smoke test)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2  # grouped-query attention: two query heads read each key/value head
    ffn: int = 192  # SwiGLU's intermediate width
    length: int = 64  # bytes per training window
    train_bytes: int = 131_072  # small enough that the model overfits it within the demo's steps
    val_bytes: int = 32_768
    val_windows: int = 256
    steps: int = 400  # per phase
    round_steps: int = 50  # steps between evaluations: one point of the curves
    batch: int = 32
    lr: float = 3e-3
    redense_lr_scale: float = 0.1


RECIPE = LMRecipe()
QUICK = LMRecipe(steps=60, round_steps=20, val_windows=64)


def adamw(params, lr: float) -> torch.optim.Optimizer:
    """AdamW, fresh in every phase of both runs (no moment estimate of a pruned weight carries over).

    Adam's per-weight step sizes are what small transformers train with; SGD with momentum (DSD's
    own optimizer, on CNNs and LSTMs) trained this LLaMA far more slowly in the same steps. No weight
    decay: the comparison is of DSD's regularisation with nothing else regularising.
    """
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def make_llama(recipe: LMRecipe, seed: int) -> torch.nn.Module:
    """A small LlamaForCausalLM over bytes, initialised from `seed`; no KV cache (a training graph)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as err:
        raise DemoError("--task lm trains transformers' LLaMA, and transformers is not installed: "
                        "pip install 'dsd-fx[lm]' (transformers>=5)") from err
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=recipe.hidden, intermediate_size=recipe.ffn,
                         num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
                         num_key_value_heads=recipe.kv_heads, max_position_embeddings=recipe.length,
                         tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def logits_of(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def lm_loop(corpus: TextCorpus, recipe: LMRecipe, seed: int) -> Loop:
    """Rounds of `round_steps` random windows; after each, the validation loss and bits per byte."""
    val_x, val_y = TextCorpus.windows(corpus.val, recipe.length)
    val_x, val_y = val_x[: recipe.val_windows], val_y[: recipe.val_windows]

    def train_round(net, opt, gen, on_step) -> float:
        net.train()
        total = 0.0
        for _ in range(recipe.round_steps):
            x, y = TextCorpus.batch(corpus.train, recipe.batch, recipe.length, gen)
            loss = F.cross_entropy(logits_of(net(x)).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step()
            total += float(loss.detach())
        return total / recipe.round_steps

    def evaluate(net) -> dict[str, float]:
        loss = validation_loss(net, val_x, val_y, recipe.batch)
        return {"val_loss": loss, "bpb": loss / LN2}

    return Loop(recipe.steps // recipe.round_steps, train_round, evaluate, adamw, seed)


def validation_loss(net, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    """Mean next-byte cross-entropy (nats) over the windows `x`, in eval mode; the mode is restored."""
    total = 0.0
    with eval_mode(net, no_grad=True):
        for i in range(0, len(x), batch):
            logits = logits_of(net(x[i : i + batch]))
            total += float(F.cross_entropy(logits.flatten(0, 1), y[i : i + batch].flatten(), reduction="sum"))
    return total / y.numel()


def table(rows: list[PhaseSummary], curves: dict[str, list[dict]]) -> str:
    """Per phase (its `rounds` counted in steps), both runs; then the final and the best validation bits per byte of each."""
    head = (f"{'phase':<9} {'steps':>5} {'lr':>7} {'sparsity':>8}  {'DSD train':>9} {'val':>6} {'bpb':>6}  "
            f"{'baseline train':>14} {'val':>6} {'bpb':>6} {'time':>7}")
    lines = [head]
    for r in rows:
        d, b = r.dsd, r.baseline
        lines.append(f"{r.phase:<9} {r.rounds:>5} {r.lr:>7.2g} {r.sparsity:>8.1%}  {d['loss']:>9.4f} {d['val_loss']:>6.3f} "
                     f"{d['bpb']:>6.3f}  {b['loss']:>14.4f} {b['val_loss']:>6.3f} {b['bpb']:>6.3f} {r.seconds:>6.1f}s")
    final = summary(curves)
    lines.append(f"final validation bits per byte: D -> S -> D {final['dsd_bpb']:.3f}, dense baseline "
                 f"{final['baseline_bpb']:.3f}, difference {final['difference']:+.3f} ({final['relative']:+.1%})")
    lines.append(f"best validation bits per byte after the fork: D -> S -> D {final['dsd_best_bpb']:.3f}, dense baseline "
                 f"{final['baseline_best_bpb']:.3f}; before the fork (dense phase) {final['dense_best_bpb']:.3f}")
    return "\n".join(lines)


def summary(curves: dict[str, list[dict]]) -> dict[str, float]:
    dsd, base = curves["dsd"], curves["baseline"]
    after = [i for i, r in enumerate(dsd) if r["phase"] != "dense"]
    d, b = dsd[-1]["bpb"], base[-1]["bpb"]
    return {"dsd_bpb": d, "baseline_bpb": b, "difference": d - b, "relative": (d - b) / b,
            "dsd_best_bpb": min(dsd[i]["bpb"] for i in after), "baseline_best_bpb": min(base[i]["bpb"] for i in after),
            "dense_best_bpb": min(r["bpb"] for r in dsd if r["phase"] == "dense")}


def start(args: argparse.Namespace):
    """Every check before any training: the flags, transformers, matplotlib, the output folder, the corpus."""
    import dsd_fx

    if args.epochs is not None:
        raise DemoError("--epochs belongs to --task classify; --task lm trains by steps: use --steps")
    if args.method == "gpp":
        raise DemoError("--method gpp (Grow-Push-Prune) runs on --task classify; --task lm runs DSD")
    classify_only = [flag for flag, given in (("--target", args.target is not None), ("--step", args.step is not None),
                                              ("--grow", args.grow is not None), ("--grow-width", args.grow_width is not None),
                                              ("--grow-how", args.grow_how is not None), ("--no-compare", not args.compare))
                     if given]
    if classify_only:
        raise DemoError(f"{', '.join(classify_only)} belong to --method gpp on --task classify; --task lm takes none of them")
    options = sparse_options(args)
    if args.criterion == "wanda" and options.get("method", "fixed") != "fixed":
        raise DemoError(f"--criterion wanda computes the mask once; --method {options['method']} recomputes it from "
                        "magnitudes at every step: use --method fixed")
    try:
        import matplotlib  # noqa: F401 - needed for the plot at the end: fail now, not after training
    except ImportError as err:
        raise DemoError("the demo's plot needs matplotlib: pip install 'dsd-fx[demo]'") from err
    base = QUICK if args.quick else RECIPE
    steps = base.steps if args.steps is None else args.steps
    if steps < base.round_steps:
        raise DemoError(f"--steps must be at least {base.round_steps} (one evaluation round), got {steps}")
    batch = base.batch if args.batch is None else args.batch
    if batch < 1:
        raise DemoError(f"--batch must be at least 1, got {batch}")
    recipe = replace(base, steps=steps - steps % base.round_steps, batch=batch, lr=base.lr if args.lr is None else args.lr)
    out = check_out(args.out)
    corpus = load_stdlib_corpus(recipe.train_bytes, recipe.val_bytes)
    net = make_llama(recipe, args.seed)
    example = TextCorpus.windows(corpus.val, recipe.length)[0][:2]
    capture = {"capture": "export", "example_args": (example,)}
    if args.criterion == "wanda":  # calibration: a few training batches, fixed by the seed
        gen = torch.Generator().manual_seed(args.seed + 1)
        options["criterion"], options["data"] = "wanda", [TextCorpus.batch(corpus.train, recipe.batch, recipe.length, gen)[0]
                                                          for _ in range(4)]
    try:
        dsd = dsd_fx.DSD(net, adamw, lr=recipe.lr, redense_lr_scale=recipe.redense_lr_scale, **capture, **options)
    except (ValueError, TypeError) as err:
        raise DemoError(flag_words(str(err))) from err
    return out, recipe, corpus, net, dsd, options, example


def run(args: argparse.Namespace) -> int:
    """The LM demo; returns 0 if the zero-overhead proof holds, 1 if not."""
    threads = torch.get_num_threads()
    if args.threads < 1:
        raise DemoError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    from dsd_fx.demo.plot import plot_lm

    started = time.perf_counter()
    out, recipe, corpus, net, dsd, options, example = start(args)
    params = sum(p.numel() for p in net.parameters())
    shown = {k: v for k, v in options.items() if k != "data"}
    print(f"dsd-fx demo --task lm: LlamaForCausalLM ({recipe.layers} layers, hidden {recipe.hidden}, {recipe.heads} "
          f"heads / {recipe.kv_heads} KV heads, SwiGLU {recipe.ffn}; {params:,} parameters) on bytes of the {corpus.describe()}; "
          f"{recipe.steps} steps per phase of {recipe.batch} x {recipe.length} bytes, sparse phase {describe(shown)}"
          f"{' (wanda)' if args.criterion == 'wanda' else ''}, AdamW lr {recipe.lr:g} (re-dense "
          f"{recipe.lr * recipe.redense_lr_scale:g}), seed {args.seed}; the dense baseline beside it", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        rows, curves, bounds, final, baseline = run_both(dsd, lm_loop(corpus, recipe, args.seed))
        for r in rows:
            r.rounds *= recipe.round_steps  # the table counts steps
        for points in curves.values():
            for point in points:
                point["step"] = point["epoch"] * recipe.round_steps
        print(table(rows, curves))
        report = prove(out, final, baseline, (example,))
    title = f"DSD vs dense, byte-level LLaMA on the Python {corpus.python} stdlib: {describe(shown)}, seed {args.seed}"
    plot_lm(curves, bounds, recipe.round_steps, os.path.join(out, "training.png"), title)
    settings = {"task": "lm", "steps": recipe.steps, "round_steps": recipe.round_steps, "batch": recipe.batch,
                "length": recipe.length, "lr": recipe.lr, "redense_lr_scale": recipe.redense_lr_scale,
                "seed": args.seed, "sparse": shown, "criterion": args.criterion, "model": {
                    k: getattr(recipe, k) for k in ("hidden", "layers", "heads", "kv_heads", "ffn")},
                "parameters": params, "optimizer": "AdamW (weight decay 0), fresh per phase"}
    corpus_info = {"python": corpus.python, "root": corpus.root, "train_bytes": len(corpus.train),
                   "val_bytes": len(corpus.val), "train_files": len(corpus.train_files), "val_files": len(corpus.val_files)}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({"args": settings, "corpus": corpus_info, "phases": [r.__dict__ for r in rows], "curves": curves,
                   "final": summary(curves), "zero_overhead": report.ok}, f, indent=1)
    print()
    print(report.table)
    print(f"\nwrote {', '.join(OUTPUTS)} to {out}")
    print(f"done in {time.perf_counter() - started:.1f} s (corpus, both trainings, export, proof and picture)")
    print(f"check the files yourself: dsd-fx check {os.path.join(out, 'reference.onnx')} {os.path.join(out, 'model.onnx')}")
    return 0 if report.ok else 1
