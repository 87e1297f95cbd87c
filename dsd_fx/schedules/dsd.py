"""The DSD schedule: drives the user's own training loop through Dense -> Sparse -> re-Dense."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import fx

from dsd_fx.infra.export_capture import check_capture_options
from dsd_fx.sparse.config import SparseConfig
from dsd_fx.sparse.divergence import SADTracker
from dsd_fx.phases import TRANSFORM_OPTIONS, transform
from dsd_fx.tags import has_dsd_nodes

OptimizerFn = Callable[[Iterable[torch.nn.Parameter], float], torch.optim.Optimizer]


@dataclass
class PhaseRecord:
    """One phase: its name, learning rate, the metrics the user logged, and SAD (dynamic masks)."""

    name: str
    lr: float
    metrics: list[dict[str, float]] = field(default_factory=list)
    sad: list[tuple[int, float]] = field(default_factory=list)  # (step, fraction changed since start)


class DSD:
    """Dense -> Sparse -> re-Dense (and DSDSD...) around the user's own loop.

    ::

        dsd = dsd_fx.DSD(model, lambda params, lr: torch.optim.SGD(params, lr, momentum=0.9), lr=0.1,
                         sparsity=0.5)
        for phase in ("dense", "sparse", "redense"):
            model, opt = dsd.begin(phase)
            for epoch in range(epochs):
                for x, y in data:
                    opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step(); dsd.step()
                dsd.log(loss=..., accuracy=...)

    Every phase gets a fresh optimizer from `optimizer_fn(parameters, lr)` (and a fresh scheduler
    from `scheduler_fn(optimizer)` if given), so no momentum of a pruned weight leaks from one
    phase into the next; re-dense trains at `lr * redense_lr_scale` (DSD: about 0.1). The sparse
    options (`sparsity`, `pattern`, `method`, `pack`, ...) and the capture options (`capture`,
    `example_args`, `example_kwargs`, `dynamic_shapes`) are those of `dsd_fx.transform`.
    """

    _NEXT = {None: ("dense", "sparse"), "dense": ("sparse",), "sparse": ("redense",), "redense": ("sparse",)}

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer_fn: OptimizerFn,
        lr: float,
        *,
        redense_lr_scale: float = 0.1,
        scheduler_fn: Callable[[torch.optim.Optimizer], Any] | None = None,
        sad_every: int = 50,
        **sparse_options: Any,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"DSD needs an nn.Module, got {type(model).__name__}")
        if not callable(optimizer_fn):
            raise TypeError("optimizer_fn must be a callable (parameters, lr) -> torch.optim.Optimizer")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not 0 < redense_lr_scale <= 1:
            raise ValueError(f"redense_lr_scale must be in (0, 1] (the DSD paper uses about 0.1), got {redense_lr_scale!r}")
        if isinstance(model, fx.GraphModule) and has_dsd_nodes(model.graph):
            raise ValueError("DSD starts from a dense model; this one is already a sparse-phase graph. Pass the model itself")
        self.model = model
        self.optimizer_fn, self.scheduler_fn = optimizer_fn, scheduler_fn
        self.lr, self.redense_lr_scale, self.sad_every = lr, redense_lr_scale, sad_every
        inspect = {k: v for k, v in sparse_options.items() if k in TRANSFORM_OPTIONS}
        if "config" in sparse_options:
            if set(sparse_options) - set(inspect) - {"config"}:
                raise TypeError("DSD: give either config= or the sparse options, not both")
            self.config = sparse_options["config"]
            if not isinstance(self.config, SparseConfig):
                raise TypeError(f"DSD: config must be a dsd_fx.SparseConfig, got {type(self.config).__name__}")
        else:  # built now, so that a bad option fails before the dense phase trains
            self.config = SparseConfig(**{k: v for k, v in sparse_options.items() if k not in inspect})
        # the capture options too fail now, not after the dense phase has trained
        check_capture_options(inspect.get("capture", "auto"), inspect.get("example_args"), inspect.get("example_kwargs"),
                              inspect.get("dynamic_shapes"))
        self.transform_options = inspect
        self.phase: str | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.history: list[PhaseRecord] = []
        self._tracker: SADTracker | None = None

    def begin(self, phase: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Enter `phase` ("dense", "sparse" or "redense") and get (model, fresh optimizer) to train."""
        allowed = self._NEXT[self.phase]
        if phase not in ("dense", "sparse", "redense"):
            raise ValueError(f"unknown phase {phase!r}; the phases are 'dense', 'sparse' and 'redense'")
        if phase not in allowed:
            now = self.phase or "the start"
            raise ValueError(
                f"DSD: phase {phase!r} cannot follow {now}; next can be {' or '.join(map(repr, allowed))} "
                "(Dense -> Sparse -> re-Dense, repeated for DSDSD)"
            )
        lr = self.lr
        if phase == "sparse":
            self.model = transform(self.model, phase="sparse", config=self.config, **self.transform_options)
        elif phase == "redense":
            inspect = {k: v for k, v in self.transform_options.items() if k.startswith("print_changed")}
            self.model = transform(self.model, phase="dense", **inspect)  # the diffs of both phases
            lr = self.lr * self.redense_lr_scale
        self.phase = phase
        self.optimizer = self.optimizer_fn(self.model.parameters(), lr)
        self.scheduler = self.scheduler_fn(self.optimizer) if self.scheduler_fn else None
        self.history.append(PhaseRecord(phase, lr))
        dynamic = phase == "sparse" and self.config.method != "fixed"
        self._tracker = SADTracker(self.model, every=self.sad_every) if dynamic else None
        return self.model, self.optimizer

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise if `optimizer` does not hold exactly the current phase's parameters."""
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        current = {id(p) for p in self.model.parameters()}
        if held != current:
            raise ValueError(
                f"DSD: this optimizer holds {len(held - current)} parameter(s) that the {self.phase} phase's model does "
                f"not have and misses {len(current - held)}; use the optimizer that begin() returned, or build one on "
                "the model begin() returned"
            )

    def step(self) -> None:
        """Call once per training step: steps the scheduler if any, records SAD for dynamic masks."""
        if self.phase is None:
            raise ValueError("DSD: call begin('dense') or begin('sparse') before step()")
        if self.scheduler is not None:
            self.scheduler.step()
        if self._tracker is not None and self._tracker.step() is not None:
            steps, _, since_start = self._tracker.history[-1]
            self.history[-1].sad.append((steps, since_start.fraction))

    def log(self, **metrics: float) -> None:
        """Record metrics (loss, accuracy, ...) for the current phase."""
        if self.phase is None:
            raise ValueError("DSD: call begin(...) before log()")
        self.history[-1].metrics.append({k: float(v) for k, v in metrics.items()})
