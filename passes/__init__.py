"""dsd_fx's graph passes: one rewrite per file, each `GraphModule -> PassResult`."""
if __name__ != "dsd_fx.passes":  # pragma: no cover - guard
    raise ImportError(
        "the graph passes ship as 'dsd_fx.passes'; import them with "
        "'from dsd_fx.passes import ...', never 'import passes'"
    )
