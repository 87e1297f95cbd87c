"""The Grow-Push-Prune schedule: drives the user's own loop through push phases and prune steps to a budget."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import fx

from dsd_fx.infra.options import fraction
from dsd_fx.schedules.dsd import OptimizerFn, PhaseRecord
from dsd_fx.push.scoring import importance
from dsd_fx.channels.macs import cost
from dsd_fx.phases import transform
from dsd_fx.push.objective import PushConfig, push_loss
from dsd_fx.tags import has_dsd_nodes
from dsd_fx.taps import recorder_of


@dataclass
class PruneStep:
    """One prune step: the fraction asked, and the parameters and MACs after it."""

    fraction: float
    params: int
    macs: int


@dataclass
class GPPRecord(PhaseRecord):
    """A phase of GPP: PhaseRecord's fields, plus params and MACs of the model it trained."""

    params: int = 0
    macs: int = 0
    steps: list[PruneStep] = field(default_factory=list)


def _fraction(value: float, name: str) -> float:
    return fraction(value, f"GPP: {name}")


LANDING_BISECTIONS = 6  # the last step's fraction within step / 64 of the smallest that meets the budget


class GPP:
    """Grow-Push-Prune around the user's own loop: optional grow phases first (the model grown by
    transform(phase="grow"), then trained), push phases (cross-entropy plus the push loss on
    a tapped layer), each followed by a prune step that removes `step` of every channel group (the
    last step less: the smallest fraction, bisected on the pruned model's cost, that meets the
    budget; inferred), until
    the parameters (or MACs) are at most `target_params` (or `target_macs`) times those of the
    model given (before any growth); then a fine-tune. ::

        gpp = dsd_fx.GPP(model, lambda p, lr: torch.optim.SGD(p, lr, momentum=0.9), lr=0.05,
                         example_args=(x,), target_params=0.25, step=0.3)
        model, opt = gpp.begin("grow", at=["conv2"], width=16, how="inception")  # optional
        for x, y in data:
            opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
        while not gpp.done:
            model, opt = gpp.begin("push")
            for x, y in data:
                opt.zero_grad(); (F.cross_entropy(model(x), y) + gpp.push_loss(y)).backward(); opt.step()
            gpp.log(loss=...)
            gpp.prune(data=data)            # importance="discriminant" uses data; "l1" ignores it
        model, opt = gpp.begin("finetune")  # untapped, smaller: train it, then export it

    `importance` ranks the channels of a prune step: "discriminant" (default, CVIU21's utility traced
    back: dsd_fx.push.scoring; prune(data=...) then needs batches), "l1" or "l2".
    Every phase gets a fresh optimizer from `optimizer_fn(parameters, lr)`. `history` records per
    phase the params, MACs, prune steps and the user's metrics. `push_weight` scales the push loss
    (its weight against cross-entropy is not in the paper: 1.0 by default, inferred, with
    PushConfig's ridge 0.1; weights of 2 or more hurt the MNIST-1D CNN: benchmarks/results_gpp_push.txt);
    `push_config` sets the push objective's options (dsd_fx.PushConfig).
    """

    def __init__(self, model: torch.nn.Module, optimizer_fn: OptimizerFn, lr: float, *, example_args: Any,
                 target_params: float | None = None, target_macs: float | None = None, step: float = 0.25,
                 importance: str = "discriminant", push_weight: float = 1.0, taps: list[str] | None = None,
                 finetune_lr_scale: float = 1.0, push_config: PushConfig | None = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"GPP needs an nn.Module, got {type(model).__name__}")
        if isinstance(model, fx.GraphModule) and has_dsd_nodes(model.graph):
            raise ValueError("GPP starts from a plain model; this one has dsd_fx nodes. Re-dense it first (transform(gm, phase='dense'))")
        if not callable(optimizer_fn):
            raise TypeError("optimizer_fn must be a callable (parameters, lr) -> torch.optim.Optimizer")
        if not lr > 0 or not finetune_lr_scale > 0 or push_weight < 0:
            raise ValueError(f"GPP: lr and finetune_lr_scale must be > 0 and push_weight >= 0, got {lr!r}, "
                             f"{finetune_lr_scale!r}, {push_weight!r}")
        if push_config is not None and not isinstance(push_config, PushConfig):
            raise TypeError(f"GPP: push_config must be a dsd_fx.PushConfig, got {type(push_config).__name__}")
        if (target_params is None) == (target_macs is None):
            raise ValueError("GPP: give exactly one budget, target_params=0.25 (a fraction of today's parameters) or target_macs=...")
        self.budget = ("params", _fraction(target_params, "target_params")) if target_params is not None \
            else ("macs", _fraction(target_macs, "target_macs"))
        self.step_fraction = _fraction(step, "step")
        self.model, self.optimizer_fn, self.lr = model, optimizer_fn, lr
        self.example_args, self.importance, self.taps = example_args, importance, taps
        self.push_weight, self.finetune_lr_scale, self.push_config = push_weight, finetune_lr_scale, push_config
        self.start = cost(model, example_args)  # bad example_args fail here, before any training
        self.now = self.start  # the cost of the current model: only a prune step changes it
        self.phase: str | None = None
        self.history: list[GPPRecord] = []

    @property
    def target(self) -> int:
        kind, fraction = self.budget
        return int(fraction * (self.start.params if kind == "params" else self.start.macs))

    @property
    def done(self) -> bool:
        """True once the model is within the budget."""
        return self._size(self.now) <= self.target

    def begin(self, phase: str, **grow: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Enter "grow" (the model grown by transform(phase="grow", **grow): at=, width=, how=,
        seed=; example_args are GPP's), "push" (the tapped model) or "finetune" (the final untapped
        model), with a fresh optimizer. Grow phases come before the first push."""
        if phase not in ("grow", "push", "finetune"):
            raise ValueError(f"GPP: unknown phase {phase!r}; the phases are 'grow', 'push' and 'finetune' (prune steps: gpp.prune())")
        if self.phase == "finetune":
            raise ValueError("GPP: the fine-tune is the last phase; nothing follows it")
        if grow and phase != "grow":
            raise TypeError(f"GPP: only begin('grow', ...) takes options, got {', '.join(sorted(grow))} for {phase!r}")
        if phase == "grow":
            return self._grow(grow)
        if phase == "push" and self.phase == "push":
            raise ValueError("GPP: a push phase is followed by a prune step (gpp.prune()), not by another push")
        if phase == "finetune" and not self.done:
            kind = self.budget[0]
            raise ValueError(f"GPP: the budget is not met yet ({kind} {self._size(self.now):,} > target {self.target:,}); "
                             "push and prune again before the fine-tune")
        plain = self._plain()
        self.model = transform(plain, phase="push", taps=self.taps) if phase == "push" else plain
        lr = self.lr * (self.finetune_lr_scale if phase == "finetune" else 1.0)
        self.history.append(GPPRecord(phase, lr, params=self.now.params, macs=self.now.macs))
        self.phase = phase
        return self.model, self.optimizer_fn(self.model.parameters(), lr)

    def _grow(self, options: dict[str, Any]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        if self.phase not in (None, "grow"):
            raise ValueError(f"GPP: grow phases come first, before the first push (now after {self.phase!r}): the "
                             "base model grows, then it is pushed and pruned")
        if "example_args" in options or "inplace" in options:
            raise TypeError("GPP: begin('grow') takes at=, width=, how=, seed=; example_args are GPP's own and the grown "
                            "model is returned (no inplace)")
        self.model = transform(self.model, phase="grow", example_args=self.example_args, **options)
        self.now = cost(self.model, self.example_args)
        self.history.append(GPPRecord("grow", self.lr, params=self.now.params, macs=self.now.macs))
        self.phase = "grow"
        return self.model, self.optimizer_fn(self.model.parameters(), self.lr)

    def push_loss(self, labels: torch.Tensor, *, sync: bool = False) -> torch.Tensor:
        """`push_weight` times the push objective of the batch the tapped model just ran (sync=True:
        of the global batch under DDP, see dsd_fx.push_loss)."""
        if self.phase != "push":
            raise ValueError("GPP: push_loss belongs to a push phase; call begin('push') first")
        return self.push_weight * push_loss(self.model, labels, config=self.push_config, sync=sync)

    def prune(self, data: Iterable | None = None) -> torch.nn.Module:
        """One prune step after a push phase: `step` of the channels of every prunable group go
        (ranked by `importance`); returns the smaller (untapped) model. The next phase is push or,
        once `done`, the fine-tune."""
        if self.phase != "push":
            raise ValueError("GPP: a prune step follows a push phase; call begin('push') and train first")
        if self.done:
            raise ValueError(f"GPP: the budget is met already ({self.budget[0]} <= {self.target:,}); begin('finetune')")
        before = self._size(self.now)
        discriminant = self.importance == "discriminant"
        if discriminant and data is None:
            raise TypeError("GPP.prune: the prune step ranks channels by importance='discriminant' (GPP's default: the "
                            "tapped layer's class separation traced back), which needs data=: (inputs, labels) batches, "
                            "a DataLoader; or build GPP(..., importance='l1') to rank by weight magnitude")
        if discriminant and data is not None and iter(data) is data:  # a one-pass iterator: read it once
            data = list(data)
        options = {"data": data} if discriminant else {}
        plain = self._plain()
        fraction = self.step_fraction
        pruned, now = self._pruned(plain, fraction, self.importance, options)
        if self._size(now) >= before:
            raise ValueError(f"GPP: the budget cannot be met: a prune step removed nothing ({self.budget[0]} {before:,}, "
                             f"target {self.target:,}); every channel group is at its smallest or unprunable. "
                             "Raise the target or make more groups prunable")
        if self._size(now) < self.target:  # the full step overshoots: the last step lands at the budget
            low = 0.0  # the smallest fraction that reaches it, bisected on the pruned model's cost
            ranking = self.importance
            if discriminant:  # scored once for every fraction tried (as the full step above scored them)
                scores = importance(plain, data, example_args=self.example_args)
                ranking = lambda group, _: scores[group.name]  # noqa: E731
            for _ in range(LANDING_BISECTIONS):
                mid = (low + fraction) / 2
                tried, cost_mid = self._pruned(plain, mid, ranking, {})
                if self._size(cost_mid) <= self.target:
                    fraction, pruned, now = mid, tried, cost_mid
                else:
                    low = mid
        self.model, self.now = pruned, now
        self.history[-1].steps.append(PruneStep(fraction, now.params, now.macs))
        self.phase = "prune"
        return self.model

    def _pruned(self, plain: torch.nn.Module, fraction: float, ranking, options: dict) -> tuple[torch.nn.Module, Any]:
        pruned = transform(plain, phase="prune", channels=fraction, importance=ranking,
                           example_args=self.example_args, **options)
        return pruned, cost(pruned, self.example_args)

    def log(self, **metrics: float) -> None:
        """Record metrics (loss, accuracy, ...) for the current phase."""
        if not self.history:
            raise ValueError("GPP: call begin(...) before log()")
        self.history[-1].metrics.append({k: float(v) for k, v in metrics.items()})

    def _plain(self) -> torch.nn.Module:
        """The current model without taps (the push phase's taps stripped by re-dense)."""
        if isinstance(self.model, fx.GraphModule) and recorder_of(self.model) is not None:
            return transform(self.model, phase="dense")
        return self.model

    def _size(self, c) -> int:
        return c.params if self.budget[0] == "params" else c.macs
