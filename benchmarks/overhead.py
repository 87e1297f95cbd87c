"""S-phase training-step overhead and transform time, measured side by side in one run.

    python benchmarks/overhead.py            # full run (a few minutes on 2 cores)
    python benchmarks/overhead.py --quick    # fewer repetitions

Prints, for an MLP (4 x Linear 1024, batch 64) and a CNN (8 convs of 64-128 channels, 32x32,
batch 32), fp32 on CPU, the median training step (forward, backward, SGD step) of:
dense, dsd_fx's sparse phase, torch.nn.utils.prune (l1_unstructured) and torch.ao.pruning
(WeightNormSparsifier), all at 50% sparsity, interleaved round-robin so that machine noise hits
every variant alike. Then the same four compiled with torch.compile (inductor; graph breaks
counted with torch._dynamo.explain; ratio = compiled step / compiled dense step). Then
transform() time over torch.fx.symbolic_trace() time for graphs of about 200, 1,400 and 5,000 nodes,
and transform(capture="export") time over torch.export.export() time for a transformers 5 Llama of
2 and 8 layers (`--only export`; skipped without transformers), and the sparse-phase training step of
the MLP and CNN captured by torch.export beside fx's (`--only export-step`).
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.utils.prune as prune
from torch import fx

import dsd_fx

SPARSITY = 0.5


def mlp() -> tuple[nn.Module, torch.Tensor]:
    layers = []
    for _ in range(4):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    return nn.Sequential(*layers), torch.randn(64, 1024)


def cnn() -> tuple[nn.Module, torch.Tensor]:
    chans = [3, 64, 64, 64, 64, 128, 128, 128, 128]
    layers = []
    for i in range(8):
        layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)), torch.randn(32, 3, 32, 32)


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def variants(make) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base, _ = make()
    out = {"dense": copy.deepcopy(base)}
    out["dsd_fx"] = dsd_fx.transform(copy.deepcopy(base), phase="sparse", sparsity=SPARSITY)
    p = copy.deepcopy(base)
    for m, name in prunable(p):
        prune.l1_unstructured(m, name, amount=SPARSITY)
    out["nn.utils.prune"] = p
    from torch.ao.pruning import WeightNormSparsifier

    ao = copy.deepcopy(base)
    names = [n for n, m in ao.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    sparsifier = WeightNormSparsifier(sparsity_level=SPARSITY, sparse_block_shape=(1, 1), zeros_per_block=1)
    sparsifier.prepare(ao, config=[{"tensor_fqn": f"{n}.weight"} for n in names])
    if all(ao.get_submodule(n).weight.dim() == 2 for n in names):
        sparsifier.step()
    else:
        # WeightNormSparsifier.step() only reshapes 2-D weights; for convs, fill the same
        # FakeSparsity parametrization's mask with torch.nn.utils.prune's L1 mask. The compute path,
        # which is what this table times, is the sparsifier's own.
        for n in names:
            m = ao.get_submodule(n)
            fake = m.parametrizations.weight[0]
            fake.mask.data = prune.L1Unstructured(SPARSITY).compute_mask(m.weight.detach(), torch.ones_like(fake.mask))
    out["torch.ao.pruning"] = ao
    return out


def step_fn(model: nn.Module, x: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    return step


def interleaved(fns: dict[str, callable], rounds: int, inner: int) -> dict[str, float]:
    times = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        for _ in range(3):
            fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def step_table(rounds: int, compiled: bool = False) -> None:
    """Median training step of each variant over dense; compiled: each one through torch.compile (inductor)."""
    what = "Compiled training step (torch.compile, inductor)" if compiled else "Training step"
    print(f"## {what}, fp32 CPU, {torch.get_num_threads()} threads, sparsity {SPARSITY:.0%} "
          f"(median of {rounds} interleaved rounds; ratio = step / {'compiled ' if compiled else ''}dense step)\n")
    extra = " graph breaks (dsd_fx / prune / ao) |" if compiled else ""
    print(f"| model | {'compiled ' if compiled else ''}dense ms | dsd_fx | torch.nn.utils.prune | torch.ao.pruning |{extra}")
    print("|---|---|---|---|---|" + ("---|" if compiled else ""))
    for name, make in (("MLP 4x1024, batch 64", mlp), ("CNN 8 conv, 32x32, batch 32", cnn)):
        _, x = make()
        models = variants(make)
        row = ""
        if compiled:
            breaks = []
            for k in ("dsd_fx", "nn.utils.prune", "torch.ao.pruning"):
                torch._dynamo.reset()
                n = torch._dynamo.explain(models[k])(x).graph_break_count
                breaks.append(str(n) if n >= 0 else "frame skipped")  # explain gives -1 when Dynamo skips the model
            torch._dynamo.reset()
            # a compiled module has its original's parameters: step_fn's optimizer holds the same tensors
            models = {k: torch.compile(m, backend="inductor") for k, m in models.items()}
            row = f" {' / '.join(breaks)} |"
        med = interleaved({k: step_fn(m, x) for k, m in models.items()}, rounds, inner=3)
        d = med["dense"]
        print(f"| {name} | {d * 1e3:.2f} | {med['dsd_fx'] / d:.3f}x | {med['nn.utils.prune'] / d:.3f}x "
              f"| {med['torch.ao.pruning'] / d:.3f}x |{row}")
    print()


class Deep(nn.Module):
    """A stack of residual MLP blocks: about 7 fx nodes per block."""

    def __init__(self, blocks: int, width: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)) for _ in range(blocks))
        self.norm = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))

    def forward(self, x):
        for block, norm in zip(self.blocks, self.norm):
            x = norm(x + block(x))
        return x


def _nogc(fn, *args):
    gc.disable()
    try:
        return fn(*args)
    finally:
        gc.enable()


def transform_time_table(rounds: int) -> None:
    print(f"## transform() time over torch.fx.symbolic_trace() time (median of {rounds})\n")
    print("Both as called (Python's cyclic GC on, as in a user's process), and both with the GC paused by")
    print("this script (what the rewrite itself costs, without the collector's passes over the heap).\n")
    print("| fx nodes | prunable weights | symbolic_trace ms (gc on / paused) | transform ms (gc on / paused) | ratio (gc on / paused) |")
    print("|---|---|---|---|---|")
    for blocks in (33, 233, 833):
        model = Deep(blocks)
        nodes = len(fx.symbolic_trace(model).graph.nodes)

        def sparse():
            return dsd_fx.transform(model, phase="sparse", sparsity=SPARSITY, copy=False)

        med = interleaved(
            {
                "trace": lambda: fx.symbolic_trace(model),
                "trace_nogc": lambda: _nogc(fx.symbolic_trace, model),
                "transform": sparse,
                "transform_nogc": lambda: _nogc(sparse),
            },
            rounds,
            inner=1,
        )
        # transform zeroes weights in place; that does not change its cost
        print(f"| {nodes} | {2 * blocks} | {med['trace'] * 1e3:.1f} / {med['trace_nogc'] * 1e3:.1f} "
              f"| {med['transform'] * 1e3:.1f} / {med['transform_nogc'] * 1e3:.1f} "
              f"| {med['transform'] / med['trace']:.2f}x / {med['transform_nogc'] / med['trace_nogc']:.2f}x |")
    print()


def export_step_table(rounds: int) -> None:
    """The S-phase training step of a graph captured by torch.export beside the fx graph's, over dense."""
    print(f"## Training step of the sparse phase, fx capture and torch.export capture, fp32 CPU, {torch.get_num_threads()} "
          f"threads, sparsity {SPARSITY:.0%} (median of {rounds} interleaved rounds; ratio = step / dense step)\n")
    print("| model | dense ms | dsd_fx, fx capture | dsd_fx, export capture |")
    print("|---|---|---|---|")
    for name, make in (("MLP 4x1024, batch 64", mlp), ("CNN 8 conv, 32x32, batch 32", cnn)):
        torch.manual_seed(0)
        base, x = make()
        models = {"dense": copy.deepcopy(base),
                  "fx": dsd_fx.transform(copy.deepcopy(base), phase="sparse", capture="fx", sparsity=SPARSITY),
                  "export": dsd_fx.transform(copy.deepcopy(base), phase="sparse", capture="export", example_args=(x,),
                                             sparsity=SPARSITY)}
        med = interleaved({k: step_fn(m, x) for k, m in models.items()}, rounds, inner=3)
        d = med["dense"]
        print(f"| {name} | {d * 1e3:.1f} | {med['fx'] / d:.3f}x | {med['export'] / d:.3f}x |")
    print()


def export_time_table(rounds: int) -> None:
    """transform(capture="export") of a transformers 5 Llama over torch.export.export of it."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("## transform() time over torch.export.export() time: skipped, needs transformers>=5\n")
        return
    print(f"## transform(capture=\"export\") time over torch.export.export() time, Llama (median of {rounds})\n")
    print("Both capture with every dimension of the (2, 16) example Dim.AUTO; transform adds the sparse phase (50%).\n")
    print("| layers | aten nodes | prunable weights | torch.export ms | transform ms | ratio |")
    print("|---|---|---|---|---|---|")
    for layers in (2, 8):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                             num_attention_heads=4, num_key_value_heads=2, use_cache=False,
                                             attn_implementation="sdpa"))
        ids = torch.randint(0, 256, (2, 16))
        auto = torch.export.Dim.AUTO

        def export():
            return torch.export.export(model, (ids,), dynamic_shapes=({0: auto, 1: auto},), strict=False).module(check_guards=False)

        def sparse():
            return dsd_fx.transform(model, phase="sparse", capture="export", example_args=(ids,), sparsity=SPARSITY)

        gm = sparse()
        nodes, weights = len(export().graph.nodes), len(dsd_fx.current_masks(gm))
        med = interleaved({"export": export, "transform": sparse}, rounds, inner=1)
        print(f"| {layers} | {nodes} | {weights} | {med['export'] * 1e3:.0f} | {med['transform'] * 1e3:.0f} "
              f"| {med['transform'] / med['export']:.2f}x |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (for a smoke test)")
    parser.add_argument("--only", choices=["step", "compiled", "transform", "export", "export-step"], help="run one table")
    args = parser.parse_args()
    if args.only in (None, "step"):
        step_table(5 if args.quick else 30)
    if args.only in (None, "compiled"):
        step_table(5 if args.quick else 20, compiled=True)
    if args.only in (None, "transform"):
        transform_time_table(3 if args.quick else 11)
    if args.only in (None, "export"):
        export_time_table(1 if args.quick else 5)
    if args.only in (None, "export-step"):
        export_step_table(5 if args.quick else 21)


if __name__ == "__main__":
    main()
