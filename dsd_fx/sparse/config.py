"""The frozen, validated configuration of a sparse-phase transform."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch

from dsd_fx.infra.options import Options

Patterns = Union[Sequence[str], Callable[..., bool], None]

SCOPES = ("layer", "global")
METHODS = ("fixed", "sr-ste", "ste")
KERNELS = ("auto", "sparse", "dense")
CRITERIA = ("magnitude", "wanda")


def _check_ratio(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where} must be a float in [0, 1), got {value!r} ({type(value).__name__})")
    v = float(value)
    if math.isnan(v) or not 0.0 <= v < 1.0:
        raise ValueError(
            f"{where} must be in [0, 1): the fraction of weights to prune; got {value!r}. "
            "Use e.g. 0.5 to prune half of each layer's weights."
        )
    return v


def _check_patterns(value: Patterns, where: str) -> Patterns:
    if value is None or callable(value):
        return value
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{where} must be a list of name patterns (fnmatch) or a predicate, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class SparseConfig(Options):
    """What the sparse phase prunes, and how much.

    sparsity: fraction of each selected weight to prune, in [0, 1), or a mapping from
        name patterns (fnmatch, matched against the weight's qualified name such as
        ``"encoder.0.fc1.weight"`` or its layer name ``"encoder.0.fc1"``) to fractions; the first
        matching pattern wins and weights matched by none stay dense (add ``"*"`` last for a default).
    include / exclude: name patterns, or a predicate ``fn(weight: PrunableWeight) -> bool``.
    scope: ``"layer"`` (DSD: the same fraction in every layer) or ``"global"`` (rank the
        magnitudes of all selected weights together).
    pattern: ``"N:M"`` (``"2:4"``, ``"4:8"``, ...): keep the N largest of every M consecutive
        weights along each weight's reduction dimension, instead of a sparsity fraction.
    method: with a pattern, ``"fixed"`` (mask computed once, held), ``"sr-ste"`` (mask recomputed
        from the dense weights at every forward; gradient STE plus ``lambda_w * (1 - M) * W``) or
        ``"ste"`` (the same with ``lambda_w = 0``).
    pack: with a fixed pattern, store each weight as its kept values plus bit-packed indices and
        compute with a packed N:M op; the dense weight is no longer kept.
    strict: with a pattern, raise (instead of skipping with a warning) on a layer whose reduction
        size is not divisible by M.
    embeddings: also prune `nn.Embedding` tables (opt-in: a lookup reads rows, it is no matmul).
        An embedding tied to an output projection is masked anyway, with the projection's one mask.
    kernel: with pack=True, ``"auto"`` (torch's semi-structured 2:4 kernels on CUDA where dtype and
        shape allow and a one-time measurement per shape finds them faster, else the dense kernel),
        ``"sparse"`` (the semi-structured kernels wherever they apply, unmeasured) or ``"dense"``
        (always unpack and use the dense kernel).
    criterion: what ranks the weights: ``"magnitude"`` (|W|, DSD's) or ``"wanda"`` (|W| times the L2
        norm of the input feature each weight multiplies, over every token of the calibration batches
        in `data`; compared within each output row, or within each N:M group; see dsd_fx.sparse.wanda). The
        mask is computed once and then fixed, as DSD holds it; SR-STE and STE recompute their masks
        from magnitudes at every forward, which would discard a Wanda mask at the first step, so
        ``criterion="wanda"`` takes ``method="fixed"`` only (and no `pack`, which ranks by magnitude,
        and no ``scope="global"``: Wanda compares within rows).
    data: with ``criterion="wanda"``, an iterable of calibration batches, each the model's input as a
        tensor or a tuple of its positional inputs; iterated once per sparse transform (pass a list
        for DSDSD: a generator is used up by the first).
    """

    sparsity: float | Mapping[str, float] | None = None
    include: Patterns = None
    exclude: Patterns = None
    scope: str = "layer"
    pattern: str | None = None
    method: str = "fixed"
    lambda_w: float = 2e-4
    pack: bool = False
    strict: bool = False
    embeddings: bool = False
    kernel: str = "auto"
    criterion: str = "magnitude"
    data: Iterable[Any] | None = field(default=None, compare=False, repr=False)

    @property
    def nm(self) -> tuple[int, int] | None:
        from dsd_fx.sparse.masks import parse_pattern

        return None if self.pattern is None else parse_pattern(self.pattern)

    @property
    def effective_lambda(self) -> float:
        return 0.0 if self.method == "ste" else float(self.lambda_w)

    def __post_init__(self) -> None:
        for name in ("pack", "strict", "embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        lam = self.lambda_w
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or math.isnan(lam) or lam < 0:
            raise ValueError(f"lambda_w must be a float >= 0 (SR-STE's paper uses 2e-4), got {lam!r}")
        if lam != 2e-4 and self.method == "fixed":
            raise ValueError(f"lambda_w={lam!r} is SR-STE's refinement weight and needs method='sr-ste' (method={self.method!r} ignores it)")
        if self.strict and self.pattern is None:
            raise ValueError("strict=True refuses layers an N:M pattern cannot cover and needs a pattern such as pattern='2:4'")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.pattern is not None:
            self._check_pattern()
        elif self.method != "fixed":
            raise ValueError(
                f"method={self.method!r} recomputes an N:M mask and needs a pattern; add pattern='2:4' (or another 'N:M')"
            )
        elif self.pack:
            raise ValueError("pack=True stores N:M-packed weights and needs a pattern such as pattern='2:4'; "
                             "an unstructured sparsity has no packed form")
        if self.sparsity is None and self.pattern is None:
            object.__setattr__(self, "sparsity", 0.5)
        if self.sparsity is None:
            pass
        elif isinstance(self.sparsity, Mapping):
            if not self.sparsity:
                raise ValueError("sparsity mapping is empty; give at least one 'pattern': fraction entry")
            checked = {}
            for pattern, value in self.sparsity.items():
                if not isinstance(pattern, str):
                    raise TypeError(f"sparsity mapping keys must be name patterns (str), got {pattern!r}")
                checked[pattern] = _check_ratio(value, f"sparsity[{pattern!r}]")
            object.__setattr__(self, "sparsity", dict(checked))
        else:
            object.__setattr__(self, "sparsity", _check_ratio(self.sparsity, "sparsity"))
        object.__setattr__(self, "include", _check_patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _check_patterns(self.exclude, "exclude"))
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.kernel != "auto" and not self.pack:
            raise ValueError(f"kernel={self.kernel!r} chooses the packed N:M op's kernel and needs pack=True")
        self._check_criterion()
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.pattern is not None and self.scope != "layer":
            raise ValueError(f"scope={self.scope!r} ranks magnitudes across layers; an N:M pattern works per group, use scope='layer'")
        if self.scope == "global" and isinstance(self.sparsity, dict):
            raise ValueError(
                "scope='global' ranks all weights together and takes one sparsity float, "
                f"not a per-layer mapping ({self.sparsity!r}); use scope='layer' for per-layer fractions"
            )


    def describe(self, weights: list[str]) -> dict:
        """The options a sparse-phase graph records (and a checkpoint must match), JSON-able."""
        info = {"format": 1, "pattern": self.pattern, "method": self.method, "pack": self.pack,
                "sparsity": self.sparsity, "scope": self.scope, "weights": sorted(weights)}
        if self.method != "fixed":
            info["lambda_w"] = self.effective_lambda
        if self.criterion != "magnitude":
            info["criterion"] = self.criterion
        return info

    def _check_criterion(self) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.criterion == "magnitude":
            if self.data is not None:
                raise ValueError("data= holds calibration batches for criterion='wanda'; magnitude needs none: "
                                 "drop data, or pass criterion='wanda'")
            return
        if self.data is None:
            raise ValueError("criterion='wanda' scores weights by their input activations and needs data=: an "
                             "iterable of calibration batches, each the model's input (a tensor or a tuple of its "
                             "positional inputs)")
        if isinstance(self.data, (torch.Tensor, str, bytes)) or not hasattr(self.data, "__iter__"):
            raise TypeError(f"data must be an iterable of calibration batches (e.g. a list of input tensors), got "
                            f"{type(self.data).__name__}; wrap one batch as [batch]")
        if self.method != "fixed":
            raise ValueError(f"criterion='wanda' computes the mask once; method={self.method!r} recomputes it from "
                             "magnitudes at every forward, so the Wanda mask would be gone at the first step. Use "
                             "method='fixed' with criterion='wanda', or criterion='magnitude' with SR-STE")
        if self.pack:
            raise ValueError("pack=True packs the N largest magnitudes of each group; criterion='wanda' needs "
                             "pack=False")
        if self.scope != "layer":
            raise ValueError(f"criterion='wanda' compares scores within each output row; scope={self.scope!r} "
                             "ranks across layers. Use scope='layer'")

    def _check_pattern(self) -> None:
        from dsd_fx.sparse.masks import parse_pattern

        if not isinstance(self.pattern, str):
            raise TypeError(f"pattern must be a string 'N:M' such as '2:4', got {self.pattern!r}")
        parse_pattern(self.pattern)
        if self.sparsity is not None:
            raise ValueError(
                f"pattern={self.pattern!r} fixes the sparsity at 1 - N/M; drop sparsity={self.sparsity!r} "
                "(use sparsity without a pattern for unstructured magnitude pruning)"
            )
        if self.pack and self.method != "fixed":
            raise ValueError(
                f"pack=True keeps only the kept values, so the mask cannot change; method={self.method!r} "
                "recomputes it every step. Use method='fixed' with pack=True, or pack=False"
            )
