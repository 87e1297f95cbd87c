"""N:M: packed storage, the packed N:M linear against dense, and the SR-STE training step.

    python benchmarks/nm.py            # CPU tables (and CUDA ones where CUDA is present)
    python benchmarks/nm.py --quick    # fewer repetitions

All ratios are medians of interleaved runs (variant / dense): below 1 is faster than dense.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch
import torch.nn.functional as F

import dsd_fx
from dsd_fx import ops
from dsd_fx.packing import pack_nm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import cnn, interleaved, mlp, step_fn  # noqa: E402


def storage_table() -> None:
    w = torch.randn(4096, 4096)
    values, meta = pack_nm(w, 2, 4)
    packed = values.numel() * values.element_size() + meta.numel() * meta.element_size()
    dense = w.numel() * w.element_size()
    print("## Storage, 4096x4096 fp32 weight, 2:4\n")
    print("| dense bytes | packed bytes (values + 2-bit indices) | ratio |")
    print("|---|---|---|")
    print(f"| {dense:,} | {packed:,} ({values.numel() * 4:,} + {meta.numel():,}) | {packed / dense:.4f}x |\n")


def _linear_fns(x, w, values, meta, backward: bool):
    xd, wd = x.clone().requires_grad_(backward), w.clone().requires_grad_(backward)
    xp, vp = x.clone().requires_grad_(backward), values.clone().requires_grad_(backward)

    def dense():
        y = F.linear(xd, wd)
        if backward:
            y.backward(torch.ones_like(y))

    def packed():
        y = ops.nm_linear(xp, vp, meta, None, 2, 4)
        if backward:
            y.backward(torch.ones_like(y))

    return {"dense": dense, "packed": packed}


def cpu_linear_table(rounds: int) -> None:
    print(f"## Packed 2:4 linear vs dense F.linear, CPU fp32, 4096x4096, {torch.get_num_threads()} threads "
          f"(median of {rounds})\n")
    print("| batch | pass | dense ms | packed ms | packed / dense |")
    print("|---|---|---|---|---|")
    w = torch.randn(4096, 4096)
    values, meta = pack_nm(w, 2, 4)
    for batch in (1, 64):
        x = torch.randn(batch, 4096)
        for backward in (False, True):
            med = interleaved(_linear_fns(x, w, values, meta, backward), rounds, inner=2)
            print(f"| {batch} | {'fwd+bwd' if backward else 'fwd'} | {med['dense'] * 1e3:.2f} | "
                  f"{med['packed'] * 1e3:.2f} | {med['packed'] / med['dense']:.2f}x |")
    print()


def _cuda_median(fns: dict, rounds: int, inner: int = 5) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize()
            times[k].append(start.elapsed_time(end) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def cuda_linear_table(rounds: int) -> None:
    from torch.sparse import to_sparse_semi_structured

    print(f"## Packed 2:4 linear vs dense on {torch.cuda.get_device_name()} (median of {rounds}, CUDA events)\n")
    print("`kernel once` is torch's semi-structured product (`to_sparse_semi_structured`) on a weight")
    print("compressed once, outside the timing: the kernel's ceiling. `packed` is dsd_fx's nm_linear, which")
    print("must rebuild the kernel's format from its packed values on every call (they change every")
    print("training step); `packed, dense kernel` is the same op with DSD_FX_NM_KERNEL=dense (unpack, dense")
    print("product). The backward is dense math in both.\n")
    print("| dtype | n = k = tokens | pass | dense ms | kernel once / dense | packed / dense | packed, dense kernel / dense |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.float16, torch.bfloat16):
        for size in (4096, 8192):
            w = torch.randn(size, size, device="cuda", dtype=dtype)
            x = torch.randn(size, size, device="cuda", dtype=dtype)
            values, meta = pack_nm(w, 2, 4)
            for backward in (False, True):
                fns = _linear_fns(x, w, values, meta, backward)
                if not backward:
                    ws = to_sparse_semi_structured(w * dsd_fx.masks.nm_mask(w, 2, 4, 1))
                    fns["kernel"] = lambda: F.linear(x, ws)
                packed_fn = fns["packed"]

                def packed_dense(fn=packed_fn):
                    os.environ["DSD_FX_NM_KERNEL"] = "dense"
                    try:
                        fn()
                    finally:
                        del os.environ["DSD_FX_NM_KERNEL"]

                fns["packed_dense"] = packed_dense
                before = ops.SEMI_STRUCTURED_CALLS[0]
                med = _cuda_median(fns, rounds)
                used = ops.SEMI_STRUCTURED_CALLS[0] > before
                kernel = f"{med['kernel'] / med['dense']:.2f}x" if "kernel" in med else "-"
                print(f"| {str(dtype).split('.')[-1]} | {size} | {'fwd+bwd' if backward else 'fwd'} | "
                      f"{med['dense']:.3f} | {kernel} | {med['packed'] / med['dense']:.2f}x"
                      f"{'' if used else ' (fallback)'} | {med['packed_dense'] / med['dense']:.2f}x |")
    print()


def sr_ste_table(rounds: int) -> None:
    print(f"## SR-STE 2:4 training step over the dense step, CPU fp32 (median of {rounds} interleaved rounds)\n")
    print("| model | dense ms | SR-STE 2:4 | fixed 2:4 |")
    print("|---|---|---|---|")
    for name, make in (("MLP 4x1024, batch 64", mlp), ("CNN 8 conv, 32x32, batch 32", cnn)):
        torch.manual_seed(0)
        base, x = make()
        models = {
            "dense": copy.deepcopy(base),
            "sr-ste": dsd_fx.transform(copy.deepcopy(base), pattern="2:4", method="sr-ste", strict=False),
            "fixed": dsd_fx.transform(copy.deepcopy(base), pattern="2:4", strict=False),
        }
        med = interleaved({k: step_fn(m, x) for k, m in models.items()}, rounds, inner=2)
        d = med["dense"]
        print(f"| {name} | {d * 1e3:.2f} | {med['sr-ste'] / d:.3f}x | {med['fixed'] / d:.3f}x |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["storage", "cpu", "cuda", "sr-ste"])
    args = parser.parse_args()
    r = 3 if args.quick else 15
    import warnings

    warnings.filterwarnings("ignore", message="dsd_fx: 2:4 skips")
    if args.only in (None, "storage"):
        storage_table()
    if args.only in (None, "cpu"):
        cpu_linear_table(r)
    if args.only in (None, "cuda") and torch.cuda.is_available():
        cuda_linear_table(r)
    if args.only in (None, "sr-ste"):
        sr_ste_table(r)


if __name__ == "__main__":
    main()
