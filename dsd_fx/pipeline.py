"""Run a recipe of passes: lint and verify after each, record what changed."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

log = logging.getLogger(__name__)

Pass = Callable[[fx.GraphModule], PassResult]
Verifier = Callable[[fx.GraphModule], None]


@dataclass(frozen=True)
class PassRecord:
    """One pass of a run: whether it changed the graph and, when recorded, the code before and
    after and the structural diff."""

    name: str
    modified: bool
    before: str | None = None
    after: str | None = None
    diff: object | None = None  # dsd_fx.diff.GraphDiff


class PassError(RuntimeError):
    pass


def run_passes(
    gm: fx.GraphModule,
    recipe: Sequence[tuple[str, Pass]],
    verify: Verifier | None = None,
    *,
    final: Verifier | None = None,
    record_code: bool = False,
) -> list[PassRecord]:
    """Run `recipe` (name, pass) in order on `gm`, in place; lint and `verify` after each pass, `final` after
    the last; generate code once."""
    from dsd_fx.diff import diff_graphs, fx_to_nx

    records: list[PassRecord] = []
    for name, fn in recipe:
        if record_code and not records:
            gm.recompile()
        before = gm.code if record_code else None
        before_nx = fx_to_nx(gm) if record_code else None
        try:
            result = fn(gm)
            result.graph_module.graph.lint()
            if record_code:
                result.graph_module.recompile()
            if verify is not None:
                verify(result.graph_module)
        except Exception as err:
            ran = ", ".join(r.name for r in records) or "none"
            raise PassError(f"pass '{name}' failed (passes run before it: {ran}): {type(err).__name__}: {err}") from err
        after = gm.code if record_code and result.modified else None
        log.debug("pass %s: %s", name, "changed" if result.modified else "no change")
        d = diff_graphs(before_nx, fx_to_nx(gm), before, after, name) if after is not None else None
        records.append(PassRecord(name, result.modified, before if result.modified else None, after, d))
    if final is not None:
        try:
            final(gm)
        except Exception as err:
            ran = ", ".join(r.name for r in records)
            raise PassError(f"the graph after passes {ran} fails verification: {err}") from err
    gm.recompile()
    return records
