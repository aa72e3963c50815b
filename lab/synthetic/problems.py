"""Benchmark problems with known Pareto fronts, as differentiable torch functions.

Every problem maps ``x (..., n) -> f(x) (..., m)``, all objectives minimised, batched over any
leading dimensions and in the dtype of ``x`` (the solvers use float64). Each carries its box
bounds, a dense sample of its true Pareto front and a reference point for hypervolume: the
hypervolume gap ``HV(true front) − HV(found points)`` scores a solver.

* ZDT1, ZDT2 — Zitzler, Deb & Thiele, "Comparison of Multiobjective Evolutionary Algorithms:
  Empirical Results", Evolutionary Computation 2000. n = 30, x ∈ [0, 1]ⁿ; convex (ZDT1) and
  concave (ZDT2) fronts. On ZDT2 linear scalarization can only reach the two end points.
* VLMOP2 — Van Veldhuizen & Lamont, 1999 (the Fonseca–Fleming function). n = 2, x ∈ [−2, 2]ⁿ;
  concave front.
* DTLZ2 — Deb, Thiele, Laumanns & Zitzler, "Scalable Test Problems for Evolutionary
  Multiobjective Optimization", 2005. m = 3, n = m − 1 + 10 (k = 10 as the paper advises),
  x ∈ [0, 1]ⁿ; the front is the positive octant of the unit sphere.

Reference points are 1.1 per objective: every front lies in [0, 1]^m, and the usual 10 %
margin lets the front's end points count.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from align.metrics import hypervolume
from align.preference import simplex_grid


class SyntheticProblem(ABC):
    """``problem(x) -> f(x)``; bounds, true front and reference point attached."""

    name: str
    num_variables: int
    num_objectives: int

    def __init__(self, lower: float, upper: float) -> None:
        self.lower = torch.full((self.num_variables,), float(lower), dtype=torch.float64)
        self.upper = torch.full((self.num_variables,), float(upper), dtype=torch.float64)
        self.reference_point = (1.1,) * self.num_objectives

    @property
    def bounds(self) -> tuple[Tensor, Tensor]:
        return self.lower, self.upper

    def __call__(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"{self.name}: x must be a floating-point tensor")
        if x.ndim == 0 or x.shape[-1] != self.num_variables:
            raise ValueError(
                f"{self.name}: x must have shape (..., {self.num_variables}), got {tuple(x.shape)}"
            )
        return self.evaluate(x)

    @abstractmethod
    def evaluate(self, x: Tensor) -> Tensor:
        """f(x) for a validated ``x (..., n)``."""

    @abstractmethod
    def pareto_front(self, num_points: int | None = None) -> np.ndarray:
        """A dense ``(N, m)`` sample of the true Pareto front."""

    def exact_hypervolume(self) -> float | None:
        """HV of the true front in closed form, where there is one."""
        return None

    @cached_property
    def true_hypervolume(self) -> float:
        """HV of the true front w.r.t. :attr:`reference_point`: the closed form where known,
        else that of the dense :meth:`pareto_front` sample (2-D fronts: within 1e-4)."""
        exact = self.exact_hypervolume()
        if exact is not None:
            return exact
        return hypervolume(self.pareto_front(), self.reference_point, maximize=False)

    def __repr__(self) -> str:
        return f"{self.name}(n={self.num_variables}, m={self.num_objectives})"


class _ZDT(SyntheticProblem):
    num_objectives = 2

    def __init__(self, num_variables: int = 30) -> None:
        if not (isinstance(num_variables, int) and num_variables >= 2):
            raise ValueError(f"{self.name} needs num_variables >= 2, got {num_variables!r}")
        self.num_variables = num_variables
        super().__init__(0.0, 1.0)

    def evaluate(self, x: Tensor) -> Tensor:
        f1 = x[..., 0]
        g = 1 + 9 * x[..., 1:].sum(-1) / (self.num_variables - 1)
        return torch.stack([f1, g * self.shape(f1 / g)], dim=-1)

    @abstractmethod
    def shape(self, ratio: Tensor) -> Tensor:
        """h(f1 / g) with f2 = g · h; the front is g = 1."""

    #: ∫_0^1 h(f1) df1, the area under the front.
    area_under_front: float

    def exact_hypervolume(self) -> float:
        # Inside the reference box, exactly the points under the front are not dominated.
        return math.prod(self.reference_point) - self.area_under_front

    def pareto_front(self, num_points: int | None = None) -> np.ndarray:
        f1 = torch.linspace(0, 1, num_points or 10_001, dtype=torch.float64)
        return torch.stack([f1, self.shape(f1)], dim=-1).numpy()


class ZDT1(_ZDT):
    """``f1 = x1``, ``f2 = g (1 − √(x1/g))``, ``g = 1 + 9 Σ_{i≥2} x_i / (n − 1)``; convex
    front ``f2 = 1 − √f1``."""

    name = "zdt1"
    area_under_front = 1 / 3

    def shape(self, ratio: Tensor) -> Tensor:
        # √ has an infinite slope at 0, and x1 = 0 is on the boundary the solvers clamp to.
        # Below 1e-8 the root is replaced by its chord through 0 (r / √1e-8): the slope stays
        # finite (1e4) and, unlike flooring the ratio, non-zero at x1 = 0, so f2 still pulls
        # x1 off the boundary; f2 moves by at most 2.5e-5.
        floor = 1e-8
        root = torch.sqrt(ratio.clamp_min(floor))
        return 1 - torch.where(ratio >= floor, root, ratio / math.sqrt(floor))


class ZDT2(_ZDT):
    """``f2 = g (1 − (x1/g)²)``; concave front ``f2 = 1 − f1²``."""

    name = "zdt2"
    area_under_front = 2 / 3

    def shape(self, ratio: Tensor) -> Tensor:
        return 1 - ratio**2


class VLMOP2(SyntheticProblem):
    """``f1 = 1 − exp(−Σ (x_i − 1/√n)²)``, ``f2 = 1 − exp(−Σ (x_i + 1/√n)²)``, x ∈ [−2, 2]ⁿ.

    The Pareto set is the diagonal segment ``x_i = t``, ``|t| ≤ 1/√n``; with ``s = √n t`` the
    front is ``(1 − e^{−(s−1)²}, 1 − e^{−(s+1)²})``, s ∈ [−1, 1], for any n.
    """

    name = "vlmop2"
    num_objectives = 2

    def __init__(self, num_variables: int = 2) -> None:
        if not (isinstance(num_variables, int) and num_variables >= 1):
            raise ValueError(f"vlmop2 needs num_variables >= 1, got {num_variables!r}")
        self.num_variables = num_variables
        super().__init__(-2.0, 2.0)

    def evaluate(self, x: Tensor) -> Tensor:
        shift = 1 / math.sqrt(self.num_variables)
        f1 = 1 - torch.exp(-((x - shift) ** 2).sum(-1))
        f2 = 1 - torch.exp(-((x + shift) ** 2).sum(-1))
        return torch.stack([f1, f2], dim=-1)

    def pareto_front(self, num_points: int | None = None) -> np.ndarray:
        s = torch.linspace(-1, 1, num_points or 10_001, dtype=torch.float64)
        return torch.stack([1 - torch.exp(-((s - 1) ** 2)), 1 - torch.exp(-((s + 1) ** 2))], -1)[
            torch.arange(s.numel() - 1, -1, -1)  # ascending f1
        ].numpy()


class DTLZ2(SyntheticProblem):
    """``f_i = (1 + g) Π_{j < m−i} cos(x_j π/2) · sin(x_{m−i} π/2)`` (no sine for i = 1),
    ``g = Σ_{j ≥ m} (x_j − ½)²``; front: ``Σ f_i² = 1``, f ≥ 0 (g = 0)."""

    name = "dtlz2"

    def __init__(self, num_objectives: int = 3, num_variables: int | None = None) -> None:
        if not (isinstance(num_objectives, int) and num_objectives >= 2):
            raise ValueError(f"dtlz2 needs num_objectives >= 2, got {num_objectives!r}")
        num_variables = num_objectives - 1 + 10 if num_variables is None else num_variables
        if not (isinstance(num_variables, int) and num_variables >= num_objectives):
            raise ValueError(
                f"dtlz2 needs num_variables >= num_objectives ({num_objectives}), "
                f"got {num_variables!r}"
            )
        self.num_objectives = num_objectives
        self.num_variables = num_variables
        super().__init__(0.0, 1.0)

    def evaluate(self, x: Tensor) -> Tensor:
        m = self.num_objectives
        g = ((x[..., m - 1 :] - 0.5) ** 2).sum(-1)
        angles = x[..., : m - 1] * (math.pi / 2)
        cos, sin = torch.cos(angles), torch.sin(angles)
        objectives = []
        for i in range(m):
            # Objective i: the first m−1−i cosines, then the sine of the next angle (if any).
            term = torch.prod(cos[..., : m - 1 - i], dim=-1)
            if i > 0:
                term = term * sin[..., m - 1 - i]
            objectives.append((1 + g) * term)
        return torch.stack(objectives, dim=-1)

    def exact_hypervolume(self) -> float:
        # A point of the reference box is dominated iff it lies outside the unit ball (its
        # projection onto the sphere dominates it): HV = box − the ball's positive orthant.
        m = self.num_objectives
        orthant = math.pi ** (m / 2) / math.gamma(m / 2 + 1) / 2**m
        return math.prod(self.reference_point) - orthant

    def pareto_front(self, num_points: int | None = None) -> np.ndarray:
        # Directions of a simplex grid fine enough for ``num_points`` (10 000 by default),
        # projected onto the sphere.
        m, wanted = self.num_objectives, num_points or 10_000
        divisions = 1
        while math.comb(divisions + m - 1, m - 1) < wanted:
            divisions += 1
        directions = simplex_grid(m, divisions)
        return (directions / directions.norm(dim=-1, keepdim=True)).numpy()


PROBLEMS: dict[str, type[SyntheticProblem]] = {
    "zdt1": ZDT1,
    "zdt2": ZDT2,
    "vlmop2": VLMOP2,
    "dtlz2": DTLZ2,
}


def get_problem(name: str, **options) -> SyntheticProblem:
    """A problem by name (``zdt1``, ``zdt2``, ``vlmop2``, ``dtlz2``); options go to its class."""
    key = str(name).strip().lower()
    if key not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; available: {', '.join(PROBLEMS)}")
    return PROBLEMS[key](**options)
