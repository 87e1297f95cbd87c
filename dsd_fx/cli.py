"""The dsd-fx command: `demo` runs the whole Dense -> Sparse -> re-Dense flow and proves the result."""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import tempfile
import warnings

import torch

from dsd_fx.demo import dsd as demo, gpp as demo_gpp, lm as demo_lm
from dsd_fx.sparse.config import SparseConfig

# SparseConfig's options that are flags here: its errors are reworded in the flags' names
FLAGS = {"sparsity": "--sparsity", "pattern": "--pattern", "method": "--method", "pack": "--pack", "kernel": "--kernel"}
KERNEL_ENV = "DSD_FX_NM_KERNEL"  # the default of --kernel


class CliError(Exception):
    """A command-line mistake: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def in_flag_words(message: str) -> str:
    """A SparseConfig message in the command line's words: `pack=True` -> `--pack`, `pack=False` ->
    `no --pack`, `pattern='2:4'` -> `--pattern 2:4`, a leading `sparsity` -> `--sparsity`."""
    names = "|".join(FLAGS)
    message = re.sub(rf"\b({names})=True\b", lambda m: FLAGS[m[1]], message)
    message = re.sub(rf"\b({names})=False\b", lambda m: f"no {FLAGS[m[1]]}", message)
    message = re.sub(rf"\b({names})=('[^']*'|[^\s,;)]+)", lambda m: f"{FLAGS[m[1]]} {m[2].strip(chr(39))}", message)
    return re.sub(rf"^({names})\b", lambda m: FLAGS[m[1]], message)


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


def _sparse_options(args: argparse.Namespace) -> SparseConfig:
    """The one SparseConfig the flags ask for; its own checks, worded in flag names. A command
    without some of these flags (the demo has no --pack or --kernel) leaves those options unset.
    $DSD_FX_NM_KERNEL is the default of --kernel where --pack asks for a packed kernel at all."""
    kernel, pack = getattr(args, "kernel", None), getattr(args, "pack", False)
    from_env = kernel is None and pack and bool(os.environ.get(KERNEL_ENV))
    if from_env:
        kernel = os.environ[KERNEL_ENV]
    given = {"sparsity": args.sparsity, "pattern": args.pattern, "method": args.method, "pack": pack or None, "kernel": kernel}
    if kernel is not None and "kernel" not in {f.name for f in dataclasses.fields(SparseConfig)}:
        raise CliError(f"--kernel {kernel}: this dsd_fx has no kernel option; leave --kernel and {KERNEL_ENV} unset")
    try:
        return SparseConfig(**{k: v for k, v in given.items() if v is not None})
    except (ValueError, TypeError) as err:
        where = f"{KERNEL_ENV}={kernel} (the default of --kernel): " if from_env and "kernel" in str(err) else ""
        raise CliError(where + in_flag_words(str(err))) from err


def _add_model_args(p) -> None:
    p.add_argument("factory", metavar="MODULE:FACTORY", help="a callable that returns the nn.Module, e.g. mypkg.models:make_model")
    p.add_argument("--input-shape", required=True, help="example input shape, e.g. 1,3,32,32 (several inputs: 1,8;1,4)")
    p.add_argument("--phase", choices=["sparse"], default="sparse", help="the phase to show (sparse, then its re-dense)")
    p.add_argument("--sparsity", type=float, help="unstructured fraction pruned (default 0.5)")
    p.add_argument("--pattern", help="N:M pattern instead of a fraction, e.g. 2:4")
    p.add_argument("--method", choices=["fixed", "sr-ste", "ste"], help="N:M method (default fixed)")
    p.add_argument("--pack", action="store_true", help="N:M-packed weights and matmuls")
    p.add_argument("--kernel", help=f"with --pack, the packed N:M matmul's kernel: auto, sparse or dense (default: ${KERNEL_ENV}, else auto)")
    p.add_argument("--capture", choices=["auto", "fx", "export"], default="auto",
                   help="how the model becomes a graph: torch.fx, torch.export (on the --input-shape example, every "
                        "dimension dynamic), or auto: fx, and torch.export where fx fails (default)")


def _check_runs(model: torch.nn.Module, example: tuple, text: str) -> None:
    """The example inputs fit the model (their number and shapes), or one CliError naming them."""
    try:
        with torch.no_grad():
            model.eval()(*example)
    except Exception as err:  # noqa: BLE001 - a shape (or a number of inputs) that does not fit the model
        raise CliError(f"the model does not run on --input-shape {text} ({len(example)} input(s)): "
                       f"{type(err).__name__}: {err}") from err


def cmd_diff(args: argparse.Namespace) -> int:
    import dsd_fx

    config = _sparse_options(args)
    model = _factory(args.factory)
    example = _shapes(args.input_shape)
    _check_runs(model, example, args.input_shape)  # before anything is printed
    mode = "cdiff" if sys.stderr.isatty() else "diff"
    sparse = dsd_fx.transform(model, phase="sparse", config=config, capture=args.capture, example_args=example,
                              print_changed=mode, print_changed_dir=args.out)
    dense = dsd_fx.transform(sparse, phase="dense", print_changed=mode, print_changed_dir=args.out)
    with torch.no_grad():  # and the rewritten graphs run on it
        sparse(*example)
        dense(*example)
    if args.out:
        print(f"wrote one folder per changed pass (code before/after, diff.txt, diff.dot and pictures) under {args.out}", file=sys.stderr)
    return 0


def _check_output(path: str) -> None:
    """-o names a file that export can write (atomically: a temporary file in its folder, renamed
    onto it), or one CliError, before the factory and the export run."""
    if not path or path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise CliError(f"-o {path!r} is a folder or no file name; give the .onnx file to write, e.g. "
                       f"{os.path.join(path or '.', 'model.onnx')}")
    if os.path.lexists(path) and not os.path.isfile(path):  # a device or a broken link would be replaced
        raise CliError(f"-o {path}: it exists and is not a regular file; give a new .onnx file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise CliError(f"cannot write {path}: folder {folder} does not exist or is not writable")
    try:  # what the export does: os.access says yes to root, even on a read-only or virtual file system
        fd, probe = tempfile.mkstemp(prefix=".dsd_fx-", suffix=".onnx.part", dir=folder)
    except OSError as err:
        raise CliError(f"cannot write {path}: folder {folder} is not writable ({err.strerror or err})") from err
    os.close(fd)
    os.unlink(probe)


def cmd_export(args: argparse.Namespace) -> int:
    import dsd_fx

    config = _sparse_options(args)
    sparse = bool(args.pattern or args.sparse)
    if not sparse and config != SparseConfig():  # options of a sparse phase that would not run
        raise CliError("--sparsity, --method, --pack and --kernel shape the sparse-phase model: add --sparse or --pattern")
    _check_output(args.output)
    model = _factory(args.factory)
    example = _shapes(args.input_shape)
    _check_runs(model, example, args.input_shape)  # a shape that does not fit: one line, not the exporter's traceback
    if sparse:
        model = dsd_fx.transform(model, phase="sparse", config=config, capture=args.capture, example_args=example)
    dsd_fx.export_onnx(model, example, args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from dsd_fx.diagnostics.graphs import load_onnx
    from dsd_fx.proof.zero_overhead import compare_onnx

    protos = []
    for path in (args.reference, args.final):
        if not os.path.isfile(path):
            raise CliError(f"no such file: {path}")
        try:
            protos.append(load_onnx(path))
        except ValueError as err:  # garbage or an empty file
            raise CliError(str(err)) from err
    result = compare_onnx(*protos)
    print(result.table)
    return 0 if result.ok else 1


def build_parser() -> argparse.ArgumentParser:
    """The dsd-fx parser and its subcommands (each sets `fn`, the function that runs it)."""
    parser = _Parser(prog="dsd-fx", description=__doc__)
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
    p = sub.add_parser("demo", help="Dense -> Sparse -> re-Dense beside a dense baseline on MNIST-1D (--task lm: a byte-level "
                                    "LLaMA); ONNX, proof, diffs, plot",
                       description=demo.__doc__.split("\n")[0] + " Writes model.onnx, reference.onnx, "
                                   "zero_overhead.txt, training.png, metrics.json and diffs/ to --out.")
    demo.add_arguments(p)
    p.set_defaults(fn=lambda a: (demo_lm.run if a.task == "lm" else demo_gpp.run if a.method == "gpp" else demo.run)(a))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run dsd-fx. A user error (a bad flag, a CliError, or the ValueError/TypeError by which dsd_fx
    refuses its input before changing anything) is one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    # the application may set process-wide filters: this one is torch's own deprecation inside its exporter
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    try:
        return args.fn(args)
    except (CliError, demo.DemoError) as err:
        print(f"dsd-fx {args.command}: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as err:
        print(f"dsd-fx {args.command}: error: {_one_line(in_flag_words(str(err)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # files are written atomically: nothing half-written is left behind
        print(f"\ndsd-fx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
