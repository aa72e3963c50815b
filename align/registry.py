"""One registry type for every named thing a config or the CLI can ask for.

Multi-gradient methods, merge methods, scorers, sweep routes, trainers and preference adapters
are each a :class:`Registry`: classes register themselves with a decorator where they are
defined, the packages holding the built-in ones are imported on the first lookup, names are
matched case-insensitively with ``-`` read as ``_``, and an unknown name is the same
:class:`UnknownNameError` everywhere, listing what is available.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T", bound=type)


class UnknownNameError(ValueError):
    """A name that no entry of a registry has; the message lists the available ones."""


def normalize_name(name: Any) -> str:
    return str(name).strip().lower().replace("-", "_")


class Registry(Generic[T]):
    """Name → class, filled by :meth:`register` decorators.

    ``what`` names the kind of thing in errors ("merge method", "scorer"); ``packages`` are
    imported on first lookup (a package's modules one by one, so each built-in registers itself;
    sub-packages are left alone, which keeps research code such as meta-training off the runtime
    import path; a plain module is imported itself); ``attribute`` is the class attribute set to
    the registered name.
    """

    def __init__(self, what: str, packages: tuple[str, ...] = (), *, attribute: str = "name"):
        self.what = what
        self.packages = packages
        self.attribute = attribute
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        """Class decorator: make the class available as ``name`` (and its aliases)."""

        def decorate(cls: T) -> T:
            for key in map(normalize_name, (name, *aliases)):
                taken = self._entries.get(key)
                if taken is not None and taken is not cls:
                    raise ValueError(f"{self.what} name {key!r} is already taken by {taken}")
                self._entries[key] = cls
            setattr(cls, self.attribute, name)
            return cls

        return decorate

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for package_name in self.packages:
            package = importlib.import_module(package_name)
            for module in pkgutil.iter_modules(getattr(package, "__path__", [])):
                if not module.ispkg:
                    importlib.import_module(f"{package_name}.{module.name}")

    def entries(self) -> dict[str, T]:
        """Every registered key (aliases included) → class, sorted by key."""
        self._load()
        return dict(sorted(self._entries.items()))

    def lookup(self, name: Any) -> tuple[str, T]:
        """``(key, class)`` for a name, or an :class:`UnknownNameError` listing the names."""
        entries = self.entries()
        key = normalize_name(name)
        if key not in entries:
            raise UnknownNameError(
                f"unknown {self.what} {name!r}; available: {', '.join(self.names())}"
            )
        return key, entries[key]

    def get(self, name: Any) -> T:
        """The class registered as ``name``."""
        return self.lookup(name)[1]

    def build(self, name: Any, /, **options: Any) -> Any:
        """A new instance of the class registered as ``name``; options it does not take are a
        ``ValueError`` naming the entry."""
        key, cls = self.lookup(name)
        try:
            return cls(**options)
        except TypeError as error:
            raise ValueError(f"bad options for {self.what} {key!r}: {error}") from error

    def names(self) -> list[str]:
        """Every registered class once, by the name it registered with, sorted."""
        return sorted({getattr(cls, self.attribute) for cls in self.entries().values()})

    def descriptions(self) -> dict[str, str]:
        """Key (aliases included) → the class's ``description``, or its docstring's first line."""
        return {
            key: getattr(cls, "description", "")
            or ((cls.__doc__ or "").strip().splitlines() or [""])[0]
            for key, cls in self.entries().items()
        }

    def __contains__(self, name: Any) -> bool:
        return normalize_name(name) in self.entries()

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {self.names()})"
