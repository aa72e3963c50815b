"""The scorer interface and registry.

A scorer maps ``(prompts, responses)`` to one float per response, higher = better for the
objective it measures. Scorers are registered by name so that evaluation configs and the CLI can
say ``positivity,brevity`` and get objects back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from align.registry import Registry

SCORERS: Registry = Registry("scorer", ("align.scorers",))


class Scorer(ABC):
    """Scores responses to prompts; higher is better."""

    name: str = "scorer"
    description: str = ""
    #: The natural range ``(worst, best)`` of the score, or None when it has none (a reward
    #: model's logit). Reports normalise by it, so hypervolume and MIP mean the same thing in
    #: every report; a scorer without one needs ``bounds: [low, high]`` in its config entry.
    bounds: tuple[float, float] | None = None

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """One float64 score per response."""
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise ValueError(
                f"{self.name}: got {len(prompts)} prompts but {len(responses)} responses; "
                f"pass one prompt per response"
            )
        for what, texts in (("prompt", prompts), ("response", responses)):
            for index, text in enumerate(texts):
                if not isinstance(text, str):
                    raise TypeError(
                        f"{self.name}: {what} {index} is {type(text).__name__}, not str"
                    )
        if not responses:
            return np.zeros(0, dtype=np.float64)
        scores = np.asarray(self._score(prompts, responses), dtype=np.float64).reshape(-1)
        if scores.shape != (len(responses),):
            raise RuntimeError(
                f"{self.name} returned {scores.shape[0]} scores for {len(responses)} responses"
            )
        return scores

    __call__ = score

    @abstractmethod
    def _score(self, prompts: list[str], responses: list[str]) -> np.ndarray: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def register_scorer(name: str, *aliases: str) -> Callable[[type[Scorer]], type[Scorer]]:
    """Class decorator: make a scorer available as ``get_scorer(name)``."""
    return SCORERS.register(name, *aliases)


def available_scorers() -> dict[str, str]:
    """Registered scorer names and their one-line descriptions."""
    return {cls.name: cls.description for cls in SCORERS.entries().values()}


def get_scorer(spec: str, **kwargs: Any) -> Scorer:
    """Build a scorer from its name, or ``name:argument`` for scorers that take a model.

    ``get_scorer("positivity")``, ``get_scorer("reward-model:path/to/rm")``.
    """
    name, _, argument = spec.partition(":")
    if argument:
        kwargs.setdefault("model", argument)
    return SCORERS.build(name, **kwargs)
