"""The dsd-fx command: `demo` runs the whole Dense -> Sparse -> re-Dense flow and proves the result."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from dsd_fx import demo


class CliError(Exception):
    """A command-line mistake: printed as one line, exit status 2."""


def _factory(spec: str):
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"'{spec}' is not MODULE:FACTORY (for example mypkg.models:make_model)")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's to fix
        raise CliError(f"cannot import module '{module_name}': {type(err).__name__}: {err}") from err
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise CliError(f"module '{module_name}' has no callable '{attr}'")
    try:
        model = fn()
    except Exception as err:  # noqa: BLE001
        raise CliError(f"{spec}() failed: {type(err).__name__}: {err}") from err
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"{spec}() returned {type(model).__name__}, not an nn.Module")
    return model


def _shapes(text: str) -> tuple:
    try:
        shapes = [tuple(int(d) for d in part.split(",")) for part in text.split(";")]
    except ValueError:
        raise CliError(f"--input-shape '{text}' is not comma-separated integers (inputs separated by ';'), e.g. 1,3,32,32") from None
    if any(not s or min(s) < 1 for s in shapes):
        raise CliError(f"--input-shape '{text}' has an empty or non-positive dimension")
    return tuple(torch.randn(*s) for s in shapes)


def _sparse_options(args) -> dict:
    opts = {}
    if args.pattern:
        opts.update(pattern=args.pattern, method=args.method, pack=args.pack)
    else:
        if args.method != "fixed" or args.pack:
            raise CliError("--method and --pack need --pattern N:M")
        opts["sparsity"] = args.sparsity
    return opts


def _add_model_args(p) -> None:
    p.add_argument("factory", metavar="MODULE:FACTORY", help="a callable that returns the nn.Module, e.g. mypkg.models:make_model")
    p.add_argument("--input-shape", required=True, help="example input shape, e.g. 1,3,32,32 (several inputs: 1,8;1,4)")
    p.add_argument("--phase", choices=["sparse"], default="sparse", help="the phase to show (sparse, then its re-dense)")
    p.add_argument("--sparsity", type=float, default=0.5, help="unstructured fraction pruned (default 0.5)")
    p.add_argument("--pattern", help="N:M pattern instead of a fraction, e.g. 2:4")
    p.add_argument("--method", default="fixed", choices=["fixed", "sr-ste", "ste"], help="N:M method (default fixed)")
    p.add_argument("--pack", action="store_true", help="N:M-packed weights and matmuls")


def cmd_diff(args) -> int:
    import dsd_fx

    model = _factory(args.factory)
    example = _shapes(args.input_shape)
    try:  # before anything is printed: the example input fits the model
        with torch.no_grad():
            model.eval()(*example)
    except Exception as err:  # noqa: BLE001 - a shape that does not fit the model
        raise CliError(f"the model does not run on --input-shape {args.input_shape}: {type(err).__name__}: {err}") from err
    mode = "cdiff" if sys.stderr.isatty() else "diff"
    try:
        sparse = dsd_fx.transform(model, phase="sparse", print_changed=mode, print_changed_dir=args.out, **_sparse_options(args))
        dense = dsd_fx.transform(sparse, phase="dense", print_changed=mode, print_changed_dir=args.out)
    except (ValueError, TypeError) as err:
        raise CliError(str(err)) from err
    with torch.no_grad():  # and the rewritten graphs run on it
        sparse(*example)
        dense(*example)
    if args.out:
        print(f"wrote one folder per changed pass (code before/after, diff.txt, diff.dot and pictures) under {args.out}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    import dsd_fx

    model = _factory(args.factory)
    example = _shapes(args.input_shape)
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise CliError(f"cannot write {args.output}: folder {folder} does not exist or is not writable")
    try:
        if args.pattern or args.sparse:
            model = dsd_fx.transform(model, phase="sparse", **_sparse_options(args))
        dsd_fx.export_onnx(model, example, args.output)
    except (ValueError, TypeError) as err:
        raise CliError(str(err)) from err
    print(f"wrote {args.output}")
    return 0


def cmd_check(args) -> int:
    import onnx

    from dsd_fx.verify import compare_onnx

    protos = []
    for path in (args.reference, args.final):
        if not os.path.isfile(path):
            raise CliError(f"no such file: {path}")
        try:
            protos.append(onnx.load(path))
        except Exception as err:  # noqa: BLE001
            raise CliError(f"{path} is not an ONNX model: {type(err).__name__}: {err}") from err
    result = compare_onnx(*protos)
    rows = [("check", "reference", "final", "ok")] + [(c.name, c.reference, c.final, "yes" if c.ok else "NO") for c in result.checks]
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    for r in rows:
        print(" | ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())
    print(f"zero overhead: {'PROVEN' if result.ok else 'NOT PROVEN'}")
    for d in result.differences:
        print(f"  - {d}")
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsd-fx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("diff", help="show what each pass does to a model: code diffs per pass, node counts, pictures",
                       description="Build the model with FACTORY, run the sparse transform and its re-dense, and "
                                   "print each pass that changed the graph as a diff; with --out, write a folder per "
                                   "pass with the code before/after and a DOT (and SVG/PNG, with Graphviz) picture.")
    _add_model_args(p)
    p.add_argument("--out", help="folder for per-pass files and pictures")
    p.set_defaults(fn=cmd_diff)
    p = sub.add_parser("export", help="export a model (optionally sparsified, masks folded) to ONNX",
                       description="Build the model with FACTORY and export it to ONNX with the dynamo exporter. "
                                   "With --sparse or --pattern, the sparse-phase model is exported, masks folded into the weights.")
    _add_model_args(p)
    p.add_argument("--sparse", action="store_true", help="export the sparse-phase model (masks folded)")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("check", help="compare two ONNX files node by node; exit 1 if they differ",
                       description="Print the zero-overhead table for REFERENCE.onnx and FINAL.onnx (node count, op "
                                   "types, isomorphism, initializers, inputs/outputs); exit 1 naming every difference.")
    p.add_argument("reference", metavar="REFERENCE.onnx")
    p.add_argument("final", metavar="FINAL.onnx")
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser("demo", help="Dense -> Sparse -> re-Dense on scikit-learn's digits; ONNX, proof, diffs, plot",
                       description=demo.__doc__.split("\n")[0] + " Writes model.onnx, reference.onnx, "
                                   "zero_overhead.txt, training.png, metrics.json and diffs/ to --out.")
    demo.add_arguments(p)
    p.set_defaults(fn=demo.run)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (CliError, demo.DemoError) as err:
        print(f"dsd-fx {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # files are written atomically: nothing half-written is left behind
        print(f"\ndsd-fx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
