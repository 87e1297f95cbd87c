"""`dsd-fx demo`: the DSD demo (dsd), the GPP demo (gpp) and the LM demo (lm), their models, runs, plots and data.

Each demo's entry point is its module's `run(args)`; models and data are shared with the benchmarks.
"""
from __future__ import annotations

from dsd_fx.infra.lazy import reexport

__all__, __getattr__ = reexport(__name__, {
    "models": ("MNIST1DCNN", "DigitsCNN", "MLP", "GRUNet", "sgd", "train_epoch", "evaluate"),
    "data": ("MissingDataPackage", "load_mnist1d", "load_digits"),
    "text_data": ("TextCorpus", "load_stdlib_corpus"),
})
