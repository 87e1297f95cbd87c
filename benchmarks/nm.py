"""N:M: packed storage, the packed N:M linear, the SR-STE training step (CPU) and the 2:4 FFN step (CUDA).

    python benchmarks/nm.py --device cpu            # storage, packed linear, SR-STE step on the 4x1024 MLP
    python benchmarks/nm.py --device cpu --quick    # the same with tiny sizes and few rounds (CI smoke run)
    python benchmarks/nm.py --device cuda           # 2:4 FFN training step, d 2048/4096/8192, 8192/32768 tokens
    python benchmarks/nm.py --device cuda --quick   # d 2048 and 4096, 8192 tokens, bf16, fewer rounds

Every figure is the median of interleaved rounds (each round runs every variant once, so machine
noise hits them alike); ratios are variant / dense, below 1 is faster than dense. Tables go to
stdout and to benchmarks/results_nm_<device name>.txt (--out to change), row by row.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import dsd_fx
from dsd_fx import ops
from dsd_fx.sparse.masks import nm_mask, nm_sparsify
from dsd_fx.sparse.packing import pack_tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import mlp, step_fn  # noqa: E402


class Report:
    """Print and append to the results file as we go: a run cut short keeps its rows."""

    def __init__(self, path: str) -> None:
        self.path = path
        open(path, "w").close()

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def interleaved(fns: dict, rounds: int, inner: int = 1, warmup: int = 3, sync=lambda: None) -> dict[str, dict]:
    """Per variant: median wall seconds, median CPU seconds of this process, minor page faults per call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    faults = {k: 0 for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(inner):
                fn()
            sync()
            wall[k].append((time.perf_counter() - t0) / inner)
            cpu[k].append((time.process_time() - c0) / inner)
            faults[k] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return {k: {"wall": statistics.median(wall[k]), "cpu": statistics.median(cpu[k]), "faults": faults[k] / (rounds * inner)}
            for k in fns}


# ---------------------------------------------------------------- CPU


def storage_table(out: Report, size: int) -> None:
    w = torch.randn(size, size)
    values, meta = pack_tensor(w, 2, 4)
    packed = values.numel() * values.element_size() + meta.numel() * meta.element_size()
    dense = w.numel() * w.element_size()
    out(f"## Storage, {size}x{size} fp32 weight, 2:4\n")
    out("| dense bytes | packed bytes (values + 2-bit indices) | ratio |")
    out("|---|---|---|")
    out(f"| {dense:,} | {packed:,} ({values.numel() * 4:,} + {meta.numel():,}) | {packed / dense:.4f}x |\n")


def cpu_linear_table(out: Report, size: int, rounds: int) -> None:
    out(f"## Packed 2:4 linear (nm_linear, CPU: unpack + dense product) vs F.linear, fp32, {size}x{size}, "
        f"{torch.get_num_threads()} threads (median of {rounds})\n")
    out("| batch | pass | dense ms | packed ms | packed / dense |")
    out("|---|---|---|---|---|")
    w = torch.randn(size, size)
    values, meta = pack_tensor(w, 2, 4)
    for batch in (1, 64):
        x = torch.randn(batch, size)
        for backward in (False, True):
            xd, wd = x.clone().requires_grad_(backward), w.clone().requires_grad_(backward)
            xp, vp = x.clone().requires_grad_(backward), values.clone().requires_grad_(backward)

            def run(y):
                if backward:
                    y.backward(torch.ones_like(y))

            med = interleaved({"dense": lambda: run(F.linear(xd, wd)), "packed": lambda: run(ops.nm_linear(xp, vp, meta, None, 2, 4))},
                              rounds, inner=2)
            d, p = med["dense"]["wall"], med["packed"]["wall"]
            out(f"| {batch} | {'fwd+bwd' if backward else 'fwd'} | {d * 1e3:.2f} | {p * 1e3:.2f} | {p / d:.2f}x |")
    out()


def former_nm_mask(weight: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """nm_mask before the pairwise-rank selection (commit e8b1f65), to time the former SR-STE step."""
    v = weight.detach().movedim(dim, -1)
    groups = v.abs().reshape(-1, m)
    cols = groups.unbind(1)
    keep = []
    for i in range(m):
        rank = torch.zeros_like(cols[i], dtype=torch.uint8)
        for j in range(m):
            if j != i:
                rank += (cols[j] >= cols[i]) if j < i else (cols[j] > cols[i])
        keep.append(rank < n)
    return torch.stack(keep, 1).view(v.shape).movedim(-1, dim).to(weight.dtype)


class FormerSparsify(torch.autograd.Function):
    """The former dsd_fx::sparsify_nm: forward W * nm_mask(W), backward grad + lambda * (W - output)."""

    @staticmethod
    def forward(ctx, weight, n, m, dim, lambda_w):
        out = weight * former_nm_mask(weight, n, m, dim)
        ctx.lambda_w = lambda_w
        ctx.save_for_backward(weight, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, out = ctx.saved_tensors
        return grad + ctx.lambda_w * (weight - out), None, None, None, None


def former_sparsify(weight, n, m, dim, lambda_w):
    return FormerSparsify.apply(weight, n, m, dim, lambda_w)


def former_sr_ste(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The same SR-STE graph, its sparsify_nm nodes calling the former code."""
    gm = copy.deepcopy(gm)
    for node in gm.graph.nodes:
        if node.target is torch.ops.dsd_fx.sparsify_nm.default:
            node.target = former_sparsify
    gm.recompile()
    return gm


def reusing_output(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The SR-STE graph with sparsify_nm(..., reuse_output=True): what insert_nm gives once it passes
    its `sole` flag (W~ feeds one matmul): the backward writes into W~'s storage."""
    gm = copy.deepcopy(gm)
    for node in gm.graph.nodes:
        if node.target is torch.ops.dsd_fx.sparsify_nm.default:
            node.args = (*node.args[:5], True)
    gm.recompile()
    return gm


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for the backward of one forward, shared storages counted once."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).square().mean()
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    return sum(b for ptr, b in seen.items() if ptr not in own)  # parameters and masks are not extra memory


def sr_ste_table(out: Report, width: int, rounds: int) -> None:
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [nn.Linear(width, width), nn.ReLU()]
    base, x = (mlp() if width == 1024 else (nn.Sequential(*layers), torch.randn(64, width)))
    models = {
        "dense": copy.deepcopy(base),
        "sr-ste": dsd_fx.transform(copy.deepcopy(base), pattern="2:4", method="sr-ste", strict=False),
        "fixed": dsd_fx.transform(copy.deepcopy(base), pattern="2:4", strict=False),
    }
    models["former sr-ste"] = former_sr_ste(models["sr-ste"])
    models["sr-ste reuse_output"] = reusing_output(models["sr-ste"])
    med = interleaved({k: step_fn(m, x) for k, m in models.items()}, rounds, inner=2)
    d = med["dense"]
    out(f"## SR-STE 2:4 training step (forward, backward, SGD) over the dense step, MLP 4x{width}, batch 64, "
        f"CPU fp32, {torch.get_num_threads()} threads (median of {rounds} interleaved rounds)\n")
    out("`former sr-ste` is the same graph running the code before this change (sort-free ranks per entry,")
    out("four weight-sized temporaries in the forward, three in the backward), timed in the same rounds.")
    out("`sr-ste reuse_output` is the same graph with sparsify_nm's reuse_output=True, which insert_nm is to set")
    out("where W~ feeds one matmul: the backward writes W's gradient into W~'s storage, no allocation.")
    out("`cpu` is the process's CPU time (robust to a busy machine); `faults` the minor page faults per step.\n")
    out("| variant | wall ms | wall / dense | cpu / dense | faults per step | saved for backward |")
    out("|---|---|---|---|---|---|")
    for k in ("dense", "sr-ste", "sr-ste reuse_output", "former sr-ste", "fixed"):
        r = med[k]
        out(f"| {k} | {r['wall'] * 1e3:.2f} | {r['wall'] / d['wall']:.3f}x | {r['cpu'] / d['cpu']:.3f}x | "
            f"{r['faults']:.0f} | {saved_bytes(models[k], x) / 2**20:.1f} MiB |")
    out()
    # where an SR-STE layer's extra time goes: one weight, the pieces timed alone, interleaved
    w = base[0].weight.detach().clone()
    g, mask = torch.randn_like(w), nm_mask(w, 2, 4, 1)
    sparse = w * mask
    pieces = {
        "former mask (nm_mask, per-entry ranks)": lambda: former_nm_mask(w, 2, 4, 1),
        "former multiply (W * mask)": lambda: w * mask,
        "former backward (grad + l * (W - out))": lambda: g + 2e-4 * (w - sparse),
        "mask and multiply (nm_sparsify)": lambda: nm_sparsify(w, 2, 4, 1),
        "backward (one allocation)": lambda: torch.sub(w, sparse).mul_(2e-4).add_(g),
        "dense step, whole model (reference)": step_fn(models["dense"], x),
    }
    med = interleaved(pieces, rounds, inner=2)
    out(f"### Where an SR-STE layer's time goes ({width}x{width} weight, alone)\n")
    out("| piece | wall ms | cpu ms | faults per call |")
    out("|---|---|---|---|")
    for k, r in med.items():
        out(f"| {k} | {r['wall'] * 1e3:.3f} | {r['cpu'] * 1e3:.3f} | {r['faults']:.0f} |")
    out()


# ---------------------------------------------------------------- CUDA


class FFN(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class _PeerLinear(torch.autograd.Function):
    """torch's stock semi-structured product, compressed from W * M by to_sparse_semi_structured
    at every step; input and weight gradients dense (the peer the packed path must beat)."""

    @staticmethod
    def forward(ctx, x, weight, mask, bias):
        from torch.sparse import to_sparse_semi_structured

        masked = weight * mask
        ctx.save_for_backward(x, masked, mask)
        y = F.linear(x.reshape(-1, x.shape[-1]), to_sparse_semi_structured(masked)).view(*x.shape[:-1], -1)
        return y + bias

    @staticmethod
    def backward(ctx, grad):
        x, masked, mask = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_w = (g2.t() @ x.reshape(-1, x.shape[-1])) * mask
        return grad @ masked, grad_w, None, g2.sum(0)


class PeerFFN(nn.Module):
    def __init__(self, ffn: FFN) -> None:
        super().__init__()
        self.ffn = ffn
        self.masks = [nm_mask(layer.weight.detach(), 2, 4, 1) for layer in (ffn.up, ffn.down)]

    def forward(self, x):
        up, down = self.ffn.up, self.ffn.down
        h = F.gelu(_PeerLinear.apply(x, up.weight, self.masks[0], up.bias))
        return _PeerLinear.apply(h, down.weight, self.masks[1], down.bias)


def with_kernel(gm: torch.fx.GraphModule, kernel: str) -> torch.fx.GraphModule:
    """The packed graph with every nm_linear given `kernel` (pack_tensor leaves the op's default, "auto")."""
    for node in gm.graph.nodes:
        if node.target is torch.ops.dsd_fx.nm_linear.default:
            node.args = (*node.args[:6], kernel)
    gm.recompile()
    return gm


def kernel_used(gm: torch.fx.GraphModule, x: torch.Tensor) -> str:
    """What the packed layers compute with: one more forward, then the compressed-weight cache
    (the last optimizer step left it stale) says which layers hold a current sparse form."""
    with torch.no_grad():
        gm(x)
    used = []
    for name, values in gm.named_parameters():
        if name.endswith("_values"):
            meta = gm.get_buffer(name[: -len("_values")] + "_meta")
            used.append(ops.SEMI_STRUCTURED.peek(values, meta) is not None)
    return "sparse" if all(used) else "dense" if not any(used) else "mixed"


def cuda_ffn_table(out: Report, dims, tokens, dtypes, rounds: int, compile_: bool) -> None:
    name = torch.cuda.get_device_name()
    out(f"## 2:4 transformer FFN training step (Linear d->4d, GELU, Linear 4d->d; forward, backward, SGD) on {name}\n")
    out(f"Median of {rounds} interleaved rounds, CUDA-synchronised wall time. Ratios: step / dense eager step;")
    out("`mask compiled` over the dense compiled step. `packed auto` chooses per shape (measured once);")
    out("`packed sparse` always runs torch's semi-structured kernels; `peer` compresses W*M with")
    out("to_sparse_semi_structured at every step. `kernel` is what packed auto ran on.\n")
    cols = ["dense", "mask", "mask compiled", "packed auto", "packed sparse", "sr-ste", "peer"]
    out("| dtype | d | tokens | dense ms | " + " | ".join(c for c in cols[1:]) + " | kernel |")
    out("|---|---|---|---|" + "---|" * (len(cols) - 1) + "---|")
    for dtype in dtypes:
        for d in dims:
            for t in tokens:
                torch._dynamo.reset()  # a fresh dynamo cache per shape: no recompile limit falls back to eager
                torch.manual_seed(0)
                base = FFN(d).cuda().to(dtype)
                x = torch.randn(t, d, device="cuda", dtype=dtype)
                models = {
                    "dense": copy.deepcopy(base),
                    "mask": dsd_fx.transform(copy.deepcopy(base), pattern="2:4"),
                    "packed auto": dsd_fx.transform(copy.deepcopy(base), pattern="2:4", pack=True),
                    "packed sparse": with_kernel(dsd_fx.transform(copy.deepcopy(base), pattern="2:4", pack=True), "sparse"),
                    "sr-ste": dsd_fx.transform(copy.deepcopy(base), pattern="2:4", method="sr-ste"),
                    "peer": PeerFFN(copy.deepcopy(base)),
                }
                fns = {k: step_fn(m, x) for k, m in models.items()}
                if compile_:
                    dense_c = torch.compile(copy.deepcopy(base))
                    mask_c = torch.compile(dsd_fx.transform(copy.deepcopy(base), pattern="2:4"))
                    fns["dense compiled"] = step_fn(dense_c, x)
                    fns["mask compiled"] = step_fn(mask_c, x)
                med = interleaved(fns, rounds, warmup=3, sync=torch.cuda.synchronize)
                dense = med["dense"]["wall"]
                cells = []
                for c in cols[1:]:
                    if c not in med:
                        cells.append("-")
                    elif c == "mask compiled":
                        cells.append(f"{med[c]['wall'] / med['dense compiled']['wall']:.3f}x")
                    else:
                        cells.append(f"{med[c]['wall'] / dense:.3f}x")
                out(f"| {str(dtype).split('.')[-1]} | {d} | {t} | {dense * 1e3:.2f} | " + " | ".join(cells)
                    + f" | {kernel_used(models['packed auto'], x)} |")
                del models, fns, base, x
                torch.cuda.empty_cache()
    out()


def device_slug(device: str) -> str:
    if device == "cuda":
        raw = torch.cuda.get_device_name()
    else:
        raw = "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                raw = "cpu " + next(line.split(":", 1)[1] for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return re.sub(r"[^a-z0-9]+", "_", raw.strip().lower()).strip("_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few rounds: checks that every table runs")
    parser.add_argument("--only", choices=["storage", "linear", "sr-ste", "ffn"])
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 15, quick 3)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); default: torch's")
    parser.add_argument("--dims", type=int, nargs="+", help="CUDA FFN widths d (default 2048 4096 8192)")
    parser.add_argument("--tokens", type=int, nargs="+", help="CUDA FFN token counts (default 8192 32768)")
    parser.add_argument("--dtypes", nargs="+", choices=["bf16", "fp16"], help="CUDA dtypes (default bf16 fp16)")
    parser.add_argument("--no-compile", action="store_true", help="CUDA: skip the compiled dense and mask steps")
    parser.add_argument("--out", help="results file (default benchmarks/results_nm_<device name>.txt)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 15)
    suffix = "_quick" if args.quick else ""
    path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), f"results_nm_{device_slug(args.device)}{suffix}.txt")
    out = Report(path)
    out(f"<!-- python benchmarks/nm.py {' '.join(sys.argv[1:])}  (torch {torch.__version__}) -->\n")
    import warnings

    warnings.filterwarnings("ignore", message="dsd_fx: 2:4 skips")
    if args.device == "cpu":
        if args.only in (None, "storage"):
            storage_table(out, 256 if args.quick else 4096)
        if args.only in (None, "linear"):
            cpu_linear_table(out, 256 if args.quick else 4096, rounds)
        if args.only in (None, "sr-ste"):
            sr_ste_table(out, 128 if args.quick else 1024, rounds)
    else:
        dims = args.dims or ([2048, 4096] if args.quick else [2048, 4096, 8192])
        tokens = args.tokens or ([8192] if args.quick else [8192, 32768])
        names = args.dtypes or (["bf16"] if args.quick else ["bf16", "fp16"])
        dtypes = [{"bf16": torch.bfloat16, "fp16": torch.float16}[n] for n in names]
        cuda_ffn_table(out, dims, tokens, dtypes, rounds, compile_=not args.no_compile)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
