"""The language-model demo's corpus: the Python standard library's own sources, read as bytes, nothing downloaded.

    corpus = load_stdlib_corpus()                      # train / validation bytes, split by file
    x, y = corpus.batch(corpus.train, 32, 128, gen)    # next-byte prediction: y is x shifted by one

The files are every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (installed packages in
``site-packages`` / ``dist-packages`` and ``__pycache__`` left out), taken in the order of a hash of
their path relative to that folder: SHA-1, not Python's salted ``hash``, so the order is the same in
every process. A file whose hash falls in the validation share goes to validation, every other file to
training, and each side is the concatenation of its files in that order, cut at its byte cap. The
vocabulary is the 256 byte values: there is no tokenizer to fetch. The same Python installation gives
the same bytes on every call; another Python version has another standard library, so its figures
differ.
"""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass

import torch

VOCAB = 256  # byte-level: every byte value is a token
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
TRAIN_BYTES = 2_000_000  # a few MB in all: big enough for many models, small enough to read in a second
VAL_BYTES = 250_000
VAL_SHARE = 10  # one file in VAL_SHARE (by hash) is a validation file


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _digest(rel: str) -> bytes:
    return hashlib.sha1(rel.encode("utf-8")).digest()


def stdlib_files(root: str | None = None) -> list[str]:
    """The standard library's ``.py`` files, as paths relative to `root`, sorted by their SHA-1 (ties by path)."""
    root = stdlib_root() if root is None else root
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in files:
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found, key=lambda rel: (_digest(rel), rel))


def is_validation(rel: str) -> bool:
    """Whether the file at `rel` (relative to the standard library's folder) is a validation file."""
    return int.from_bytes(_digest(rel)[:4], "big") % VAL_SHARE == 0


@dataclass(frozen=True)
class TextCorpus:
    """Train and validation bytes (uint8 tensors) and the files each came from, in order."""

    train: torch.Tensor
    val: torch.Tensor
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    root: str
    python: str

    def describe(self) -> str:
        return (f"Python {self.python} standard library ({self.root}): {len(self.train):,} train bytes from "
                f"{len(self.train_files)} files, {len(self.val):,} validation bytes from {len(self.val_files)} other files")

    @staticmethod
    def batch(data: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch` random windows of `length` bytes from `data` (int64) and the bytes that follow each."""
        starts = torch.randint(0, len(data) - length, (batch,), generator=gen)
        rows = torch.stack([data[s : s + length + 1] for s in starts.tolist()]).long()
        return rows[:, :-1], rows[:, 1:]

    @staticmethod
    def windows(data: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every whole non-overlapping window of `length` bytes of `data` and the bytes that follow: the evaluation set."""
        count = (len(data) - 1) // length
        x = data[: count * length].long().view(count, length)
        y = data[1 : count * length + 1].long().view(count, length)
        return x, y


def _read(root: str, files: list[str], cap: int) -> tuple[torch.Tensor, tuple[str, ...]]:
    parts, used, size = [], [], 0
    for rel in files:
        if size >= cap:
            break
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read(cap - size)
        parts.append(data)
        used.append(rel)
        size += len(data)
    joined = b"".join(parts)
    return torch.frombuffer(bytearray(joined), dtype=torch.uint8).clone(), tuple(used)


def load_stdlib_corpus(train_bytes: int = TRAIN_BYTES, val_bytes: int = VAL_BYTES, root: str | None = None) -> TextCorpus:
    """The standard library's sources split by file: at most `train_bytes` to train on, `val_bytes` to validate.

    Deterministic: the same installation gives the same bytes on every call and in every process.
    Raises ValueError if the caps are not positive or the folder holds too few sources to fill a window.
    """
    for name, value in (("train_bytes", train_bytes), ("val_bytes", val_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1024:
            raise ValueError(f"{name} must be an int >= 1024 (bytes of source text), got {value!r}")
    root = stdlib_root() if root is None else root
    files = stdlib_files(root)
    val_files = [f for f in files if is_validation(f)]
    train_files = [f for f in files if not is_validation(f)]
    train, train_used = _read(root, train_files, train_bytes)
    val, val_used = _read(root, val_files, val_bytes)
    if len(train) < 1024 or len(val) < 1024:
        raise ValueError(f"the standard library at {root} gave only {len(train)} train and {len(val)} validation "
                         "bytes of .py source; is this a full Python installation?")
    python = ".".join(map(str, sys.version_info[:3]))
    return TextCorpus(train, val, train_used, val_used, root, python)
