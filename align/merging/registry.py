"""One registry of merge methods: ``get_merge_method("ties", density=0.5)``.

Methods live one per file in :mod:`align.merging.methods` and register themselves with
:func:`register_merge_method`; the package is imported on first lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from align._registry import Registry
from align.merging.base import MergeMethod

_METHODS = Registry("merge method", ("align.merging.methods",))


def register_merge_method(name: str, *aliases: str) -> Callable[[type], type]:
    """Class decorator: make a method available as ``get_merge_method(name)``."""
    return _METHODS.register(name, *aliases)


def available_merge_methods() -> dict[str, str]:
    """Name → first line of the docstring of every registered method (aliases included)."""
    return {
        name: (cls.__doc__ or "").strip().splitlines()[0]
        for name, cls in _METHODS.classes().items()
    }


def get_merge_method(name: str | MergeMethod | Any, **options: Any) -> Any:
    """A new instance of the method called ``name`` (options go to its constructor); an
    instance passes through unchanged."""
    if not isinstance(name, str):
        if options:
            raise ValueError("options can only be given with a method name, not an instance")
        return name
    return _METHODS.lookup(name)[1](**options)
