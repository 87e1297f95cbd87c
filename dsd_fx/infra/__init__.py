"""Graph infrastructure: capture a model as a GraphModule, rewrite its module calls, run passes as a recipe.

graph_capture (nn.Module -> GraphModule over the model's own parameters: symbolic_trace, or torch.export
through export_capture), rewrite (the surgery the
passes share), pipeline (the runner: invariants after each pass, records of what changed), lazy (this
folder's re-exports). The tags the passes set live in dsd_fx.tags: saved graphs name that path.
"""
from __future__ import annotations

from dsd_fx.infra.lazy import reexport

__all__, __getattr__ = reexport(__name__, {
    "graph_capture": ("capture",),
    "export_capture": ("check_capture_options", "export_module", "is_exported"),
    "rewrite": ("owner_of", "get_attr", "input_of", "functionalize", "wrap_weight_uses"),
    "pipeline": ("Invariant", "PassRecord", "Observer", "Plan", "PassError", "note", "shapes_of", "run_passes"),
})
