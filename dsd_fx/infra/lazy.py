"""A folder's re-exports, imported when first read (PEP 562), so that no folder's __init__ makes an import cycle."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Sequence


def reexport(package: str, names: Mapping[str, Sequence[str]]) -> tuple[list[str], Callable[[str], Any]]:
    """`__all__` and a module `__getattr__` for `package`, from {module: names it defines}.

    Eager re-exports would import every module of a folder with its first, and the folders sit at
    different heights of the import graph (ops, below the passes, reads sparse.packing; the sparse
    plans run the passes): a name is imported from its module when it is first read instead."""
    where = {name: module for module, defined in names.items() for name in defined}
    clash = sorted(set(where) & set(names))
    if clash:
        raise ValueError(f"{package}: {clash} would name both a module and a function; rename one")

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    return sorted(where), __getattr__
