"""One registry for every multi-gradient method: ``get_aggregator("mgda")``.

Methods live one per file in :mod:`align.mograd.scalarizations` (loss-level),
:mod:`align.mograd.aggregators` (gradient-level) and :mod:`align.mograd.learned` (update-level:
ML2O, GML2O) and register themselves with
:func:`register_aggregator`; the packages are imported on first lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from align._registry import Registry
from align.mograd.base import GradientAggregator, LossAggregator

_METHODS = Registry(
    "multi-gradient method",
    ("align.mograd.scalarizations", "align.mograd.aggregators", "align.mograd.learned"),
)


def register_aggregator(name: str, *aliases: str) -> Callable[[type], type]:
    """Class decorator: make a method available as ``get_aggregator(name)``."""
    return _METHODS.register(name, *aliases)


def aggregator_class(name: str) -> type:
    """The class registered as ``name`` (aliases accepted), or a ValueError listing them."""
    return _METHODS.lookup(name)[1]


def canonical_aggregators() -> list[str]:
    """Every registered method once, by its canonical name (aliases dropped), sorted."""
    return _METHODS.canonical_names()


def preference_aware_aggregators() -> list[str]:
    """Canonical names of the methods whose update depends on α: those that need it
    (``uses_preference``: Tchebycheff, smooth Tchebycheff, EPO, ...) and those that use it when
    given (``preference_aware``: linear scalarization, UPGrad, ...). The others ignore α."""
    return sorted(
        {
            cls.name
            for cls in _METHODS.classes().values()
            if getattr(cls, "uses_preference", False) or getattr(cls, "preference_aware", False)
        }
    )


def available_aggregators() -> dict[str, str]:
    """Name → kind ("loss", "gradient" or "update") of every registered method (aliases
    included)."""
    return {name: cls.kind for name, cls in _METHODS.classes().items()}


def get_aggregator(
    name: str | LossAggregator | GradientAggregator, **kwargs: Any
) -> LossAggregator | GradientAggregator:
    """A new instance of the method called ``name`` (keyword arguments go to its constructor);
    an instance passes through unchanged."""
    if isinstance(name, LossAggregator | GradientAggregator) or (
        isinstance(name, nn.Module) and getattr(name, "kind", None) == "update"
    ):
        if kwargs:
            raise ValueError("options can only be given with a method name, not an instance")
        return name
    key, cls = _METHODS.lookup(name)
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ValueError(f"bad options for {key!r}: {error}") from error
