"""Run a recipe of passes: lint and check the named invariants after each, report what changed."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

log = logging.getLogger(__name__)

Pass = Callable[[fx.GraphModule], PassResult]


@dataclass(frozen=True)
class Invariant:
    """A named property of the graph that must hold after a pass; `check(gm)` raises
    AssertionError saying what does not hold."""

    name: str
    check: Callable[[fx.GraphModule], None]


@dataclass(frozen=True)
class PassRecord:
    """One pass of a run: whether it changed the graph and, when observed, the code before and
    after and what the observer made of the change (a dsd_fx GraphDiff)."""

    name: str
    modified: bool
    before: str | None = None
    after: str | None = None
    diff: object | None = None


class Observer(Protocol):
    """Sees each pass: `before(gm)` returns a snapshot; `after(name, snapshot, gm)` what changed."""

    def before(self, gm: fx.GraphModule) -> Any: ...

    def after(self, name: str, snapshot: Any, gm: fx.GraphModule) -> object: ...


@dataclass
class Plan:
    """A phase's work: the passes with their invariants, the record, and the commit that runs
    only after every check and every diagnostic has passed."""

    recipe: list[tuple[str, Pass]]
    invariants: list[Invariant]
    commit: Callable[[], None]
    records: list  # the phase's state.MaskRecords (empty where it makes none)
    final: tuple = ()


NOTES = "dsd_fx_notes"  # gm.meta key: {pass name: text of a change the code does not show}


def note(gm: fx.GraphModule, pass_name: str, text: str) -> None:
    """Say what a pass changed that its code diff cannot show (pruning and growing change shapes,
    not code); the diff observer appends it to that pass's diff."""
    gm.meta.setdefault(NOTES, {})[pass_name] = text


def shapes_of(gm: fx.GraphModule, layers: dict[str, Sequence[str]]) -> dict[str, tuple]:
    """{"<layer>.<tensor>": shape} of the named tensors of each layer (for a pass's note)."""
    return {f"{layer}.{t}" if layer else t: tuple(getattr(gm.get_submodule(layer), t).shape)
            for layer, ts in layers.items() for t in ts if t}


class PassError(RuntimeError):
    """A pass broke an invariant or failed for a reason that is not the user's input: a bug."""


def _check(gm: fx.GraphModule, invariants: Sequence[Invariant], after: str, ran: list[str]) -> None:
    for inv in invariants:
        try:
            inv.check(gm)
        except Exception as err:  # noqa: BLE001 - an invariant that cannot even be checked is broken too
            raise PassError(f"invariant '{inv.name}' does not hold after {after} (passes run: {', '.join(ran)}): {err}") from err


def run_passes(
    gm: fx.GraphModule,
    recipe: Sequence[tuple[str, Pass]],
    invariants: Sequence[Invariant] = (),
    *,
    final: Sequence[Invariant] = (),
    observer: Observer | None = None,
) -> list[PassRecord]:
    """Run `recipe` [(name, pass)] in order on `gm`, in place; lint and check `invariants` after
    each pass and `final` after the last; generate code once (per pass only when observed).

    A ValueError or TypeError of a pass is about the user's input: it propagates as it is. Any
    other failure, or a broken invariant, is a PassError naming the passes that ran.
    """
    records: list[PassRecord] = []
    ran: list[str] = []
    for name, fn in recipe:
        before = snapshot = None
        if observer is not None:
            gm.recompile()
            before, snapshot = gm.code, observer.before(gm)
        try:
            result = fn(gm)
            result.graph_module.graph.lint()
        except (ValueError, TypeError):
            raise
        except Exception as err:
            raise PassError(f"pass '{name}' failed (passes run before it: {', '.join(ran) or 'none'}): "
                            f"{type(err).__name__}: {err}") from err
        ran.append(name)
        _check(gm, invariants, f"pass '{name}'", ran)
        log.debug("pass %s: %s", name, "changed" if result.modified else "no change")
        if observer is not None and result.modified:
            gm.recompile()
            records.append(PassRecord(name, True, before, gm.code, observer.after(name, snapshot, gm)))
        else:
            records.append(PassRecord(name, result.modified))
    _check(gm, final, "the last pass", ran)
    gm.recompile()
    return records
