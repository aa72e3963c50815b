"""One registry for every multi-gradient method: ``get_aggregator("mgda")``.

Methods live one per file in :mod:`align.mograd.scalarizations` (loss-level) and
:mod:`align.mograd.aggregators` (gradient-level) and register themselves with
:func:`register_aggregator`; the packages are imported on first lookup.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from align.mograd.base import GradientAggregator, LossAggregator

_REGISTRY: dict[str, type[LossAggregator] | type[GradientAggregator]] = {}
_PACKAGES = ("align.mograd.scalarizations", "align.mograd.aggregators")
_loaded = False


def register_aggregator(name: str, *aliases: str) -> Callable[[type], type]:
    """Class decorator: make a method available as ``get_aggregator(name)``."""

    def decorate(cls: type) -> type:
        for key in (name, *aliases):
            if key in _REGISTRY and _REGISTRY[key] is not cls:
                raise ValueError(f"aggregator name {key!r} is already taken by {_REGISTRY[key]}")
            _REGISTRY[key] = cls
        cls.name = name
        return cls

    return decorate


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    for package_name in _PACKAGES:
        package = importlib.import_module(package_name)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package_name}.{module.name}")
    _loaded = True


def available_aggregators() -> dict[str, str]:
    """Name → kind ("loss" or "gradient") of every registered method (aliases included)."""
    _load_builtin()
    return {name: cls.kind for name, cls in sorted(_REGISTRY.items())}


def get_aggregator(
    name: str | LossAggregator | GradientAggregator, **kwargs: Any
) -> LossAggregator | GradientAggregator:
    """A new instance of the method called ``name`` (keyword arguments go to its constructor);
    an instance passes through unchanged."""
    if isinstance(name, LossAggregator | GradientAggregator):
        if kwargs:
            raise ValueError("options can only be given with a method name, not an instance")
        return name
    _load_builtin()
    key = str(name).strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown multi-gradient method {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        )
    try:
        return _REGISTRY[key](**kwargs)
    except TypeError as error:
        raise ValueError(f"bad options for {key!r}: {error}") from error
