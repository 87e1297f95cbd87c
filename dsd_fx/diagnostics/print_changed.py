"""LLVM's -print-changed for dsd_fx's passes: after a transform, show each pass that changed the graph."""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Sequence, TextIO

from dsd_fx.diagnostics.graph_diff import colorize
from dsd_fx.infra.pipeline import PassRecord

MODES = ("quiet", "diff", "cdiff")


@dataclass(frozen=True)
class PrintChanged:
    """mode: "quiet" (the code after each changed pass), "diff" (unified diff), "cdiff" (coloured
    diff); directory: also write one folder per changed pass (MLIR's IR tree); passes: only these."""

    mode: str | None = None
    directory: str | None = None
    passes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"print_changed must be one of {MODES} or None, got {self.mode!r}")

    @property
    def active(self) -> bool:
        return self.mode is not None or self.directory is not None

    @classmethod
    def resolve(cls, mode: str | None, directory: str | None, passes: Sequence[str] | None) -> "PrintChanged":
        """Explicit arguments win over DSD_FX_PRINT_CHANGED, DSD_FX_PRINT_CHANGED_DIR, DSD_FX_PRINT_CHANGED_PASSES."""
        env = os.environ
        mode = mode if mode is not None else (env.get("DSD_FX_PRINT_CHANGED") or None)
        directory = directory if directory is not None else (env.get("DSD_FX_PRINT_CHANGED_DIR") or None)
        if passes is None and env.get("DSD_FX_PRINT_CHANGED_PASSES"):
            passes = [p.strip() for p in env["DSD_FX_PRINT_CHANGED_PASSES"].split(",") if p.strip()]
        return cls(mode, directory, tuple(passes) if passes is not None else None)

    def check(self) -> None:
        """Fail now, before any work, if `directory` cannot be written: create it and write a probe file.

        Raises ValueError naming the folder and the cause. A transform calls it before its first pass,
        so that writing the per-pass files later cannot fail on the folder.
        """
        if self.directory is None:
            return
        try:
            os.makedirs(self.directory, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.directory):
                pass
        except OSError as err:
            raise ValueError(
                f"print_changed_dir {self.directory!r} cannot be written ({err.strerror or err}); "
                "pass a folder you can write to, or none"
            ) from err

    def emit(self, records: Sequence[PassRecord], phase: str, stream: TextIO | None = None) -> None:
        """Print (to `stream`, default stderr) and write under `directory` each changed pass of `records`.

        The text files raise on failure (call `check()` first); a picture that fails is logged, never raised."""
        stream = stream or sys.stderr
        shown = [r for r in records if r.modified and r.diff is not None and (self.passes is None or r.name in self.passes)]
        for r in shown:
            if self.mode == "quiet":
                stream.write(f"*** code after {r.name} ({phase} phase) ***\n{r.after.strip()}\n\n")
            elif self.mode in ("diff", "cdiff"):
                text = f"*** {r.name} ({phase} phase) ***\n{r.diff.code}\n# nodes: {r.diff.summary}\n"
                stream.write((colorize(text) if self.mode == "cdiff" else text) + "\n")
        if self.directory:
            self._write_tree(shown, phase)

    def _write_tree(self, shown: Sequence[PassRecord], phase: str) -> None:
        os.makedirs(self.directory, exist_ok=True)
        start = len([d for d in os.listdir(self.directory) if d[:2].isdigit()])
        for k, r in enumerate(shown, start):
            folder = os.path.join(self.directory, f"{k:02d}_{phase}_{r.name}")
            os.makedirs(folder, exist_ok=True)
            for name, text in (("before.py", r.before), ("after.py", r.after), ("diff.txt", r.diff.render(color=False))):
                with open(os.path.join(folder, name), "w") as f:
                    f.write(text.strip() + "\n")
            r.diff.write_pictures(os.path.join(folder, "diff"))
