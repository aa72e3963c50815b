"""The preference vector α: the one contract every part of align speaks.

α has one weight per objective, each ≥ 0, summing to 1 (a point on the simplex). It always
travels with the names of its objectives, so that two parts that order their objectives
differently can never silently swap weights (reference code has shipped α in the wrong order
because only positions were stored). A batch may carry one α per row: shape ``(B, m)``.

Bad α is a ``ValueError`` naming the value, never a silent renormalisation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch

SUM_TOLERANCE = 1e-6

PreferenceLike = Union[
    "Preference", Mapping[str, float], Sequence[float], np.ndarray, torch.Tensor, str
]


def check_objectives(objectives: Sequence[str]) -> tuple[str, ...]:
    """Validate a list of objective names and return it as a tuple."""
    if isinstance(objectives, str):
        raise ValueError(
            f"objectives must be a sequence of names, got the string {objectives!r}; "
            f"write ({objectives!r},) for a single objective"
        )
    names = tuple(objectives)
    if not names:
        raise ValueError("objectives must name at least one objective, got an empty list")
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"objective names must be non-empty strings, got {name!r} in {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"objective names must be unique, got {names}")
    return names


def require_same_objectives(
    ours: Sequence[str],
    theirs: Sequence[str],
    ours_label: str = "this",
    theirs_label: str = "the other",
) -> None:
    """Refuse to combine two parts whose objectives (names and order) disagree."""
    if tuple(ours) != tuple(theirs):
        raise ValueError(
            f"objective names disagree: {ours_label} has {tuple(ours)}, {theirs_label} has "
            f"{tuple(theirs)}; objectives are matched by name and order"
        )


def _format_vector(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def validate_weights(weights: np.ndarray, objectives: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless every row of ``weights`` is a point on the simplex."""
    m = len(objectives)
    if weights.ndim not in (1, 2) or weights.shape[-1] != m:
        raise ValueError(
            f"a preference for objectives {objectives} needs {m} weights (shape ({m},) or (B, {m})), "
            f"got shape {tuple(weights.shape)}: {weights.tolist()}"
        )
    rows = weights.reshape(-1, m)
    for index, row in enumerate(rows):
        where = f" (row {index})" if weights.ndim == 2 else ""
        if not np.all(np.isfinite(row)):
            raise ValueError(f"preference {_format_vector(row)}{where} has non-finite weights")
        if np.any(row < 0):
            raise ValueError(
                f"preference {_format_vector(row)}{where} has negative weights; "
                f"each weight must be >= 0"
            )
        total = float(row.sum())
        if abs(total - 1.0) > SUM_TOLERANCE:
            raise ValueError(
                f"preference {_format_vector(row)}{where} for objectives {objectives} sums to "
                f"{total:.8g}, not 1 (tolerance {SUM_TOLERANCE:g}); align never renormalises silently"
            )


class Preference:
    """A preference vector α (or a batch of them) over named objectives.

    ``weights`` is stored as a float64 tensor of shape ``(m,)`` or ``(B, m)``; use
    :meth:`to_tensor` to get it in the dtype and on the device of a model.
    """

    __slots__ = ("objectives", "weights")

    def __init__(self, weights: Any, objectives: Sequence[str]):
        self.objectives = check_objectives(objectives)
        array = _as_float64_array(weights, self.objectives)
        validate_weights(array, self.objectives)
        self.weights = torch.from_numpy(array)

    # --- construction --------------------------------------------------------------------
    @classmethod
    def coerce(cls, value: PreferenceLike, objectives: Sequence[str]) -> Preference:
        """Build a preference from anything align accepts as α.

        * a :class:`Preference` (re-ordered by name if its objectives are the same set),
        * a dict ``{"helpful": 0.7, "harmless": 0.3}``,
        * a vector of length m or a ``(B, m)`` batch (list, numpy array, tensor),
        * a string ``"helpful=0.7,harmless=0.3"`` or ``"0.7,0.3"``.
        """
        objectives = check_objectives(objectives)
        if isinstance(value, Preference):
            if value.objectives == objectives:
                return value
            if set(value.objectives) != set(objectives):
                require_same_objectives(objectives, value.objectives, "expected", "the preference")
            order = [value.objectives.index(name) for name in objectives]
            return cls(value.weights[..., order], objectives)
        if isinstance(value, str):
            return cls.parse(value, objectives)
        if isinstance(value, Mapping):
            return cls.from_dict(value, objectives)
        return cls(value, objectives)

    @classmethod
    def from_dict(cls, weights: Mapping[str, float], objectives: Sequence[str]) -> Preference:
        objectives = check_objectives(objectives)
        if set(weights) != set(objectives):
            missing = [name for name in objectives if name not in weights]
            extra = [name for name in weights if name not in objectives]
            raise ValueError(
                f"preference {dict(weights)} does not match objectives {objectives}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {extra}" if extra else "")
            )
        return cls([float(weights[name]) for name in objectives], objectives)

    @classmethod
    def parse(cls, text: str, objectives: Sequence[str]) -> Preference:
        """Parse ``"helpful=0.7,harmless=0.3"`` (by name) or ``"0.7,0.3"`` (by position)."""
        parts = [part.strip() for part in text.split(",") if part.strip()]
        try:
            if parts and all("=" in part for part in parts):
                pairs = [part.split("=", 1) for part in parts]
                names = [name.strip() for name, _ in pairs]
                if len(set(names)) != len(names):
                    raise ValueError(f"preference {text!r} names an objective twice")
                return cls.from_dict({n: float(v) for n, (_, v) in zip(names, pairs)}, objectives)
            return cls([float(part) for part in parts], objectives)
        except ValueError as error:
            if "preference" in str(error):
                raise
            raise ValueError(
                f"cannot parse preference {text!r}: write 'name=weight,...' or 'w1,w2,...' "
                f"for objectives {tuple(objectives)}"
            ) from error

    @classmethod
    def uniform(cls, objectives: Sequence[str]) -> Preference:
        objectives = check_objectives(objectives)
        m = len(objectives)
        weights = np.full(m, 1.0 / m)
        weights[-1] = 1.0 - weights[:-1].sum()
        return cls(weights, objectives)

    @classmethod
    def vertex(cls, objective: str, objectives: Sequence[str]) -> Preference:
        """The corner of the simplex that puts all weight on ``objective``."""
        objectives = check_objectives(objectives)
        if objective not in objectives:
            raise ValueError(f"unknown objective {objective!r}; objectives are {objectives}")
        return cls([1.0 if name == objective else 0.0 for name in objectives], objectives)

    # --- views ---------------------------------------------------------------------------
    @property
    def num_objectives(self) -> int:
        return len(self.objectives)

    @property
    def is_batched(self) -> bool:
        return self.weights.ndim == 2

    def __len__(self) -> int:
        if not self.is_batched:
            raise TypeError("a single preference has no length; check .is_batched first")
        return self.weights.shape[0]

    def __getitem__(self, index: int) -> Preference:
        if not self.is_batched:
            raise TypeError("only a batch of preferences can be indexed")
        return Preference(self.weights[index], self.objectives)

    def __iter__(self):
        if not self.is_batched:
            raise TypeError("only a batch of preferences can be iterated")
        return (self[i] for i in range(len(self)))

    def to_tensor(self, dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
        return self.weights.to(dtype=dtype, device=device)

    def to_dict(self) -> dict[str, float]:
        if self.is_batched:
            raise TypeError("to_dict() needs a single preference; index the batch first")
        return {name: float(w) for name, w in zip(self.objectives, self.weights)}

    def expand(self, batch_size: int) -> Preference:
        """One row per example: a single α repeated, or a batch checked for its size."""
        if self.is_batched:
            if len(self) != batch_size:
                raise ValueError(
                    f"preference batch has {len(self)} rows but the input batch has {batch_size}"
                )
            return self
        return Preference(self.weights.expand(batch_size, -1).clone(), self.objectives)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Preference):
            return NotImplemented
        return self.objectives == other.objectives and torch.equal(self.weights, other.weights)

    def __hash__(self) -> int:
        return hash((self.objectives, tuple(self.weights.flatten().tolist())))

    def __repr__(self) -> str:
        if self.is_batched:
            return f"Preference(batch of {len(self)}, objectives={self.objectives})"
        inner = ", ".join(f"{n}={float(w):.4g}" for n, w in zip(self.objectives, self.weights))
        return f"Preference({inner})"

    def __str__(self) -> str:
        if self.is_batched:
            return repr(self)
        return ",".join(f"{n}={float(w):.4g}" for n, w in zip(self.objectives, self.weights))


def _as_float64_array(weights: Any, objectives: tuple[str, ...]) -> np.ndarray:
    if isinstance(weights, torch.Tensor):
        array = weights.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            array = np.asarray(weights, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"preference {weights!r} for objectives {objectives} is not a vector of numbers"
            ) from error
    return np.array(array, dtype=np.float64, copy=True)


def simplex_grid(m: int, n: int = 10) -> torch.Tensor:
    """The uniform grid on the simplex: every α whose weights are multiples of 1/n.

    Returns ``C(n+m-1, m-1)`` rows ordered by ascending first weight, so for m = 2, n = 10 it is
    the usual 11-point evaluation grid (0, 1), (0.1, 0.9), …, (1, 0).
    """
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"simplex_grid needs m >= 1 objectives, got {m!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"simplex_grid needs n >= 1 divisions, got {n!r}")
    rows = []
    # Compositions of n into m non-negative parts via stars and bars, in lexicographic order.
    for bars in itertools.combinations(range(n + m - 1), m - 1):
        edges = (-1, *bars, n + m - 1)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(m)])
    grid = torch.tensor(sorted(rows), dtype=torch.float64) / n
    assert grid.shape[0] == math.comb(n + m - 1, m - 1)
    return grid


def sample_preferences(
    m: int,
    num_samples: int | None = None,
    concentration: float = 1.0,
    generator: torch.Generator | np.random.Generator | int | None = None,
) -> torch.Tensor:
    """Draw α ~ Dirichlet(concentration · 1).

    concentration = 1 is uniform on the simplex; PARM uses 0.5, which favours the corners.
    Returns shape ``(m,)`` or ``(num_samples, m)`` in float64. ``generator`` makes draws
    reproducible: a torch generator (advanced by one draw), a numpy generator, or a seed.
    """
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"sample_preferences needs m >= 1 objectives, got {m!r}")
    if (
        not (isinstance(concentration, (int, float)) and math.isfinite(concentration))
        or concentration <= 0
    ):
        raise ValueError(
            f"Dirichlet concentration must be a finite number > 0, got {concentration!r}"
        )
    rng = _numpy_generator(generator)
    size = None if num_samples is None else (num_samples,)
    draws = rng.dirichlet(np.full(m, float(concentration)), size=size)
    # Guard against float64 round-off so every draw passes validate_weights exactly.
    draws = draws / draws.sum(axis=-1, keepdims=True)
    return torch.from_numpy(draws)


def _numpy_generator(generator: Any) -> np.random.Generator:
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return np.random.default_rng(seed)
    return np.random.default_rng(generator)
