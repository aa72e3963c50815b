"""One registry of merge methods: ``get_merge_method("ties", density=0.5)``.

Methods live one per file in :mod:`align.merging.methods` and register themselves with
:func:`register_merge_method`; the package is imported on first lookup.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from align.merging.base import MergeMethod

_REGISTRY: dict[str, type] = {}
_loaded = False


def register_merge_method(name: str, *aliases: str) -> Callable[[type], type]:
    """Class decorator: make a method available as ``get_merge_method(name)``."""

    def decorate(cls: type) -> type:
        for key in (name, *aliases):
            if key in _REGISTRY and _REGISTRY[key] is not cls:
                raise ValueError(f"merge method name {key!r} is already taken by {_REGISTRY[key]}")
            _REGISTRY[key] = cls
        cls.name = name
        return cls

    return decorate


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    package = importlib.import_module("align.merging.methods")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"align.merging.methods.{module.name}")
    _loaded = True


def available_merge_methods() -> dict[str, str]:
    """Name → first line of the docstring of every registered method (aliases included)."""
    _load_builtin()
    return {
        name: (cls.__doc__ or "").strip().splitlines()[0] for name, cls in sorted(_REGISTRY.items())
    }


def get_merge_method(name: str | MergeMethod | Any, **options: Any) -> Any:
    """A new instance of the method called ``name`` (options go to its constructor); an
    instance passes through unchanged."""
    if not isinstance(name, str):
        if options:
            raise ValueError("options can only be given with a method name, not an instance")
        return name
    _load_builtin()
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown merge method {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[key](**options)
