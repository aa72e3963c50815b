"""One registry for every multi-gradient method: ``get_aggregator("mgda")``.

Methods live one per file in :mod:`align.mograd.scalarizations` (loss-level),
:mod:`align.mograd.aggregators` (gradient-level) and :mod:`align.mograd.learned` (update-level:
ML2O, GML2O) and register themselves with
:func:`register_aggregator`; the packages are imported on first lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from align.mograd.base import MultiGradientMethod
from align.registry import Registry

#: Research code (meta-training, synthetic problems) lives outside the package, in the
#: repository's ``lab/``: nothing here imports it.
METHODS: Registry = Registry(
    "multi-gradient method",
    ("align.mograd.scalarizations", "align.mograd.aggregators", "align.mograd.learned"),
)


def register_aggregator(name: str, *aliases: str) -> Callable[[type], type]:
    """Class decorator: make a method available as ``get_aggregator(name)``."""
    return METHODS.register(name, *aliases)


def aggregator_class(name: str) -> type:
    """The class registered as ``name`` (aliases accepted), or an error listing them."""
    return METHODS.get(name)


def canonical_aggregators() -> list[str]:
    """Every registered method once, by its canonical name (aliases dropped), sorted."""
    return METHODS.names()


def preference_aware_aggregators() -> list[str]:
    """Canonical names of the methods whose update depends on α: those that need it
    (``uses_preference``: Tchebycheff, smooth Tchebycheff, EPO, ...) and those that use it when
    given (``preference_aware``: linear scalarization, UPGrad, ...). The others ignore α."""
    return sorted(
        {
            cls.name
            for cls in METHODS.entries().values()
            if getattr(cls, "uses_preference", False) or getattr(cls, "preference_aware", False)
        }
    )


def require_preference_aware(name: str, who: str, allowed: bool = False) -> None:
    """Refuse a method that ignores α for ``who``, which conditions a model on α: its update
    would not depend on α, so the α path would learn nothing α-dependent. ``allowed`` lets the
    user opt out (``allow_preference_blind_aggregator``)."""
    if allowed:
        return
    method = aggregator_class(name)
    if not (method.uses_preference or getattr(method, "preference_aware", False)):
        raise ValueError(
            f"{who} conditions the adapter on α, but aggregator {name!r} ignores α, so the α "
            f"path would learn nothing α-dependent; use a preference-aware method "
            f"({', '.join(preference_aware_aggregators())}) or set "
            f"allow_preference_blind_aggregator: true"
        )


def available_aggregators() -> dict[str, str]:
    """Name → kind ("loss", "gradient" or "update") of every registered method (aliases
    included)."""
    return {name: cls.kind for name, cls in METHODS.entries().items()}


def get_aggregator(name: str | MultiGradientMethod, **kwargs: Any) -> MultiGradientMethod:
    """A new instance of the method called ``name`` (keyword arguments go to its constructor);
    an instance passes through unchanged."""
    if isinstance(name, MultiGradientMethod):
        if kwargs:
            raise ValueError("options can only be given with a method name, not an instance")
        return name
    return METHODS.build(name, **kwargs)
