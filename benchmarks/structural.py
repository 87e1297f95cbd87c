"""Structural pruning, dsd_fx against Torch-Pruning (DepGraph + MagnitudePruner), side by side.

    python benchmarks/structural.py               # every model, 25% of channels, ~2 minutes on 2 cores
    python benchmarks/structural.py --quick       # fewer timing runs

Each model is pruned at the same fraction by both tools, each with L1 magnitude importance, per
group ("layer" scope), the classifier's outputs and the model's inputs kept. Reported per model
and tool: whether it handled the model (pruned it and the result runs), the parameter and MAC
ratio (both counted by dsd_fx.cost from the graph, the same counter for both), the time to
analyse and prune (median), the pruned model's latency ratio against the unpruned one in torch
and in onnxruntime (interleaved medians, 1 thread), and, where both tools produced the same
shapes, whether they removed the same channels and the outputs' max difference. Then dsd_fx's
analyse+prune time over ResNet depths, to show it grows linearly with the node count.
Writes benchmarks/results_structural.txt (or --out).
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import random
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import dsd_fx.phases
from dsd_fx.channels.macs import cost
from dsd_fx.proof.export import export_onnx
from dsd_fx.proof.pruned import verify_pruned
from dsd_fx.proof.runtime import feeds as ort_feeds, session as ort_session

HERE = os.path.dirname(os.path.abspath(__file__))
log = logging.getLogger("structural")


class Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (self.down(x) if self.down is not None else x))


class ResNet(nn.Module):
    """ResNet-style CNN: stem, `depth` basic blocks per stage over 4 stages, global pool, classifier."""

    def __init__(self, depth: int = 1, width: int = 32) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        blocks, cin = [], width
        for k, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            for d in range(depth):
                blocks.append(Basic(cin, cout, 2 if k and not d else 1))
                cin = cout
        self.blocks, self.fc = nn.Sequential(*blocks), nn.Linear(cin, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.blocks(F.relu(self.bn(self.stem(x)))), 1).flatten(1))


class Inverted(nn.Module):
    def __init__(self, c: int, t: int = 4) -> None:
        super().__init__()
        h = c * t
        self.body = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                                  nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                                  nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.body(x)


class MobileNet(nn.Module):
    """MobileNetV2-style: inverted residuals with depthwise convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        self.blocks = nn.Sequential(Inverted(32), Inverted(32), nn.Conv2d(32, 64, 1), Inverted(64))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class Dense(nn.Module):
    """DenseNet-style: each layer's output concatenated onto all before it, BN after the concats."""

    def __init__(self, growth: int = 16, layers: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, 1, 1)
        self.convs = nn.ModuleList(nn.Conv2d(32 + k * growth, growth, 3, 1, 1) for k in range(layers))
        self.bn, self.fc = nn.BatchNorm2d(32 + layers * growth), nn.Linear(32 + layers * growth, 10)

    def forward(self, x):
        z = self.stem(x)
        for conv in self.convs:
            z = torch.cat([z, conv(F.relu(z))], 1)
        return self.fc(F.relu(self.bn(z)).mean((2, 3)))


class Encoder(nn.Module):
    """A transformer encoder block (nn.MultiheadAttention + MLP): only the MLP hidden dim is free."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.ln1, self.attn = nn.LayerNorm(dim), nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        h = self.embed(x)
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(h.mean(1))


class CatSelf(nn.Module):
    """torch.cat([y, y]): one producer's channels twice in one consumer's input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.mix, self.fc = nn.Conv2d(3, 32, 3, 1, 1), nn.Conv2d(64, 32, 1), nn.Linear(32, 10)

    def forward(self, x):
        y = F.relu(self.conv(x))
        return self.fc(self.mix(torch.cat([y, y], 1)).mean((2, 3)))


class FlatCNN(nn.Module):
    """A CNN whose last conv is flattened into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1, self.c2 = nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.Conv2d(32, 32, 3, 2, 1)
        self.fc1, self.fc2 = nn.Linear(32 * 8 * 8, 128), nn.Linear(128, 10)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.bn1(self.c1(x)))))
        return self.fc2(F.relu(self.fc1(torch.flatten(h, 1))))


IMG = (8, 3, 32, 32)
MODELS = {"resnet": (ResNet, IMG, "fc"), "mobilenetv2": (MobileNet, IMG, "fc"), "densenet": (Dense, IMG, "fc"),
          "flatten_cnn": (FlatCNN, IMG, "fc2"), "cat_self": (CatSelf, IMG, "fc"), "encoder_mha": (Encoder, (8, 16, 16), "head")}


def _dsd(model, x, fraction, importance="l1"):
    return dsd_fx.phases.transform(model, phase="prune", channels=fraction, example_args=(x,), importance=importance)


def weights_only_l1(model: nn.Module):
    """L1 over the members' weights only (no biases, no norm shifts): Torch-Pruning's criterion,
    to see whether the two tools then remove the same channels."""
    def importance(group, example_args) -> torch.Tensor:
        scores = torch.zeros(group.size)
        for m in group.members:
            if m.tensor != "weight":
                continue
            w = model.get_submodule(m.layer).weight.detach().abs()
            per_index = w.movedim(m.dim, 0).reshape(w.shape[m.dim], -1).sum(1)
            for c in range(m.start, m.start + m.length):
                scores[c] += per_index[m.positions([c])].sum()
        return scores
    return importance


def _tp(model, x, fraction, head):
    import torch_pruning as tp

    model = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=fraction,
                                       ignored_layers=[model.get_submodule(head)])
    pruner.step()
    return model


def _timed(fn, runs: int):
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def _agreement(a: nn.Module, b: nn.Module, x) -> str:
    sa, sb = a.state_dict(), b.state_dict()
    if any(k in sb and sa[k].shape != sb[k].shape for k in sa):
        return "different shapes"
    same = all(torch.equal(sa[k], sb[k]) for k in sa if k in sb and sa[k].is_floating_point())
    with torch.no_grad():
        diff = (a.eval()(x) - b.eval()(x)).abs().max().item()
    return f"{'same' if same else 'different'} channels, max |out diff| {diff:.1e}"


def _latencies(models: dict[str, nn.Module], x, runs: int) -> dict[str, tuple[float, float]]:
    """(torch, onnxruntime) median seconds per model, every model timed in each round, in a new order each round."""
    sessions = {k: ort_session(export_onnx(m, (x,), fold=False)) for k, m in models.items()}
    feeds = {k: ort_feeds(s, (x,)) for k, s in sessions.items()}
    times = {k: ([], []) for k in models}
    order, shuffle = list(models), random.Random(0).shuffle
    with torch.no_grad():
        for _ in range(runs + 2):
            shuffle(order)  # no model always runs first (warm caches) or last
            for k in order:
                m = models[k]
                for slot, call in enumerate((lambda: m(x), lambda: sessions[k].run(None, feeds[k]))):
                    t0 = time.perf_counter()
                    call()
                    times[k][slot].append(time.perf_counter() - t0)
    return {k: (statistics.median(t[2:]), statistics.median(o[2:])) for k, (t, o) in times.items()}


def run_model(name: str, fraction: float, runs: int, latency_runs: int) -> list[str]:
    make, shape, head = MODELS[name]
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(*shape)
    base = cost(model, x)
    tools = {"dsd_fx": lambda: _dsd(model, x, fraction), "torch_pruning": lambda: _tp(model, x, fraction, head)}
    pruned, seconds, proofs, lines = {}, {}, {}, []
    for tool, fn in tools.items():
        try:
            out, seconds[tool] = _timed(fn, runs)
            with torch.no_grad():
                assert out.eval()(x).shape == model(x).shape
        except Exception as err:  # noqa: BLE001 - a tool that fails on a model is a result
            lines.append(f"{name:<12} {tool:<14} FAILED: {type(err).__name__}: {str(err).splitlines()[0][:110]}")
            continue
        pruned[tool] = out
        report = verify_pruned(model, out, x, latency_runs=1)
        proofs[tool] = "same ONNX ops" if report.ok else "ONNX differs: " + "; ".join(
            f"{row.name}: {row.pruned}" for row in report.rows if row.ok is False)
    lat = _latencies({"original": model, **pruned}, x, latency_runs)
    for tool, out in pruned.items():
        c = cost(out, x)
        t, o = (lat[tool][k] / lat["original"][k] for k in (0, 1))
        lines.append(f"{name:<12} {tool:<14} params {c.params / base.params:.3f}x  MACs {c.macs / base.macs:.3f}x  "
                     f"prune {seconds[tool] * 1e3:6.1f} ms  latency torch {t:.2f}x ort {o:.2f}x  {proofs[tool]}")
    if len(pruned) == 2:
        same_rule = _dsd(model, x, fraction, weights_only_l1(model))
        lines.append(f"{name:<12} {'agreement':<14} L1 with biases: {_agreement(pruned['dsd_fx'], pruned['torch_pruning'], x)}; "
                     f"weights-only L1: {_agreement(same_rule, pruned['torch_pruning'], x)}")
    return lines


def scaling(runs: int) -> list[str]:
    lines = ["", "dsd_fx analyse+prune time over ResNet depth (width 16, 25%):"]
    for depth in (1, 2, 4, 8):
        model, x = ResNet(depth, 16).eval(), torch.randn(1, 3, 32, 32)
        nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
        _, seconds = _timed(lambda: _dsd(model, x, 0.25), runs)
        lines.append(f"  depth {depth}: {nodes:4d} nodes  {seconds * 1e3:7.1f} ms  {seconds * 1e6 / nodes:6.1f} us/node")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results_structural.txt"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    runs, latency_runs = (1, 10) if args.quick else (5, 50)
    lines = [f"structural pruning at {args.fraction:.0%} of channels, L1 magnitude, torch {torch.__version__}, 1 thread",
             "ratios are pruned / unpruned; latency: interleaved medians, batch as in MODELS", ""]
    for name in MODELS:
        model_lines = run_model(name, args.fraction, runs, latency_runs)
        log.info("\n".join(model_lines))
        lines += model_lines
    lines += scaling(runs)
    log.info("\n".join(lines[-5:]))
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
