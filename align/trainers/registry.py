"""The trainers a recipe's ``trainer:`` can name, each registered beside its config dataclass."""

from __future__ import annotations

from collections.abc import Callable

from align.registry import Registry

TRAINERS: Registry = Registry("trainer", ("align.trainers",), attribute="trainer_name")


def register_trainer(name: str, *aliases: str) -> Callable[[type], type]:
    """Class decorator for a trainer with a ``config_class`` (its TRL-style config dataclass)."""
    return TRAINERS.register(name, *aliases)
