"""A name → class registry whose built-in entries live one per module in some packages.

Shared by the multi-gradient methods (``get_aggregator``) and the merge methods
(``get_merge_method``): classes register themselves with a decorator, the packages are imported
on the first lookup, names are matched case-insensitively with ``-`` read as ``_``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable


class Registry:
    def __init__(self, what: str, packages: tuple[str, ...]) -> None:
        self.what = what  # "multi-gradient method", "merge method": used in errors
        self.packages = packages
        self.entries: dict[str, type] = {}
        self._loaded = False

    def register(self, name: str, *aliases: str) -> Callable[[type], type]:
        """Class decorator: make ``cls`` available under ``name`` (and aliases)."""

        def decorate(cls: type) -> type:
            for key in (name, *aliases):
                if key in self.entries and self.entries[key] is not cls:
                    raise ValueError(
                        f"{self.what} name {key!r} is already taken by {self.entries[key]}"
                    )
                self.entries[key] = cls
            cls.name = name
            return cls

        return decorate

    def classes(self) -> dict[str, type]:
        """Every registered name (aliases included) → class, built-ins imported first."""
        if not self._loaded:
            for package_name in self.packages:
                package = importlib.import_module(package_name)
                for module in pkgutil.iter_modules(package.__path__):
                    importlib.import_module(f"{package_name}.{module.name}")
            self._loaded = True
        return dict(sorted(self.entries.items()))

    def lookup(self, name: str) -> tuple[str, type]:
        """``(key, class)`` for a name, or a ``ValueError`` listing what is available."""
        classes = self.classes()
        key = str(name).strip().lower().replace("-", "_")
        if key not in classes:
            raise ValueError(f"unknown {self.what} {name!r}; available: {', '.join(classes)}")
        return key, classes[key]

    def canonical_names(self) -> list[str]:
        """Every registered class once, by the name it registered with, sorted."""
        return sorted({cls.name for cls in self.classes().values()})
