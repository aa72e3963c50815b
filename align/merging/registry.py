"""One registry of merges: ``get_merge_method("ties", density=0.5)``.

Tensor-level methods live one per file in :mod:`align.merging.methods`; the merges of their
own kind live in their own modules (``lora``: :mod:`align.merging.lora`, ``pareto``:
:mod:`align.merging.pareto`). Each registers itself with :func:`register_merge_method`, and
those modules are imported on first lookup. Tensor-level methods
(:class:`~align.merging.engine.MergeMethod`) and the others are all
:class:`~align.merging.base.Merge` and are all found here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from align.merging.base import Merge
from align.registry import Registry

METHODS: Registry = Registry(
    "merge method", ("align.merging.methods", "align.merging.lora", "align.merging.pareto")
)


def register_merge_method(name: str, *aliases: str) -> Callable[[type], type]:
    """Class decorator: make a method available as ``get_merge_method(name)``."""
    return METHODS.register(name, *aliases)


def available_merge_methods() -> dict[str, str]:
    """Name → first line of the docstring of every registered method (aliases included)."""
    return METHODS.descriptions()


def get_merge_method(name: str | Merge, **options: Any) -> Merge:
    """A new instance of the method called ``name`` (options go to its constructor); an
    instance passes through unchanged."""
    if isinstance(name, Merge):
        if options:
            raise ValueError("options can only be given with a method name, not an instance")
        return name
    return METHODS.build(name, **options)
