"""FairGrad: α-fair allocation of the update's benefit among the objectives.

Ban & Ji (ICML 2024), "Fair resource allocation in multi-task learning", Equation 4 and the
step of Algorithm 1; torchjd's ``FairGrad`` (same equation; torchjd's ``alpha`` is ``alpha``).
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from align.mograd.aggregators.solvers import as_float64, definite_part, to_weights
from align.mograd.base import GradientAggregator
from align.mograd.registry import register_aggregator


@register_aggregator("fairgrad")
class FairGrad(GradientAggregator):
    """``d = Σ w_i g_i`` with ``w > 0`` solving ``G w = w^{−1/α}`` (elementwise), i.e.
    ``g_i · d = w_i^{−1/α}``: the update maximising ``Σ_i u(g_i · d)`` for the α-fair utility
    u (``log`` at α = 1, where this is Nash-MTL's equation; ``x^{1−α}/(1−α)`` otherwise) within
    a ball. α → 0 is linear scalarisation (torchjd returns ``w = 1/m`` at α = 0, and so do we);
    larger α favours the objective that gains least (α → ∞: max-min fairness).

    Solver: the equation is the stationarity condition of the strictly convex
    ``f(w) = ½ wᵀGw − Σ_i h(w_i)`` with ``h' = w^{−1/α}``; damped Newton with a backtracking line
    search that keeps w > 0 (torchjd runs SciPy's ``least_squares`` on the residual from
    ``1/m``, stopped by its tolerances). It runs on ``G / ‖G‖_F`` and rescales:
    ``(G/N) β = β^{−1/α}`` gives ``w = β · N^{−α/(α+1)}``. So ``J → cJ`` scales w by
    ``c^{−2α/(α+1)}`` and d by ``c^{(1−α)/(1+α)}``: the update does not scale with the gradients
    (at α = 1 it does not change at all). As for Nash-MTL, a solution exists when zero is not in
    the convex hull of the gradients; ``reg_eps`` (a ridge on the normalised Gram) keeps w
    finite otherwise, and a zero gradient gets weight 0.

    Args:
        alpha: α ≥ 0 (default 1; torchjd has no default, the paper tunes it per benchmark).
        reg_eps, tol, max_iters: as Nash-MTL's.
    """

    def __init__(
        self, alpha: float = 1.0, reg_eps: float = 1e-10, tol: float = 1e-20, max_iters: int = 200
    ) -> None:
        super().__init__()
        if not (isinstance(alpha, int | float) and 0 <= alpha < float("inf")):
            raise ValueError(f"FairGrad: alpha must be a finite number >= 0, got {alpha!r}")
        if not reg_eps > 0 or not tol > 0 or max_iters < 1:
            raise ValueError("FairGrad: reg_eps and tol must be > 0, max_iters >= 1")
        self.alpha, self.reg_eps, self.tol, self.max_iters = (
            float(alpha),
            float(reg_eps),
            float(tol),
            int(max_iters),
        )

    def compute_weights(
        self, gram: Tensor, losses: Tensor | None, preference: Tensor | None
    ) -> Tensor:
        g = as_float64(gram)
        m = g.shape[0]
        if self.alpha == 0.0:
            return to_weights(np.full(m, 1.0 / m), gram)
        weights = np.zeros(m)
        part = definite_part(g, self.reg_eps)  # f is then strictly convex
        if part is None:
            return to_weights(weights, gram)
        alive, h, frobenius = part
        weights[alive] = self._solve(h) * frobenius ** (-self.alpha / (self.alpha + 1.0))
        return to_weights(weights, gram)

    def _utility(self, w: np.ndarray) -> float:
        """``Σ h(w_i)``, the antiderivative of ``w^{−1/α}``."""
        if self.alpha == 1.0:
            return float(np.log(w).sum())
        power = 1.0 - 1.0 / self.alpha
        return float((w**power).sum() / power)

    def _solve(self, h: np.ndarray) -> np.ndarray:
        """Damped Newton for ``min ½ wᵀHw − Σ h(w)`` (H positive definite)."""
        a, k = self.alpha, h.shape[0]

        def f(w: np.ndarray) -> float:
            return 0.5 * float(w @ h @ w) - self._utility(w)

        # The best point of the ray t·1: t S = t^{−1/α}, S = 1ᵀH1.
        total = float(h.sum())
        w = np.full(k, total ** (-a / (a + 1.0)) if total > 0 else 1.0)
        value = f(w)
        for _ in range(self.max_iters):
            grad = h @ w - w ** (-1.0 / a)
            hessian = h + np.diag(w ** (-1.0 / a - 1.0) / a)
            step = np.linalg.solve(hessian, grad)
            decrement2 = float(grad @ step)
            if decrement2 <= self.tol or np.abs(step).max() <= 1e-15 * np.abs(w).max():
                break
            t = 1.0
            while True:  # backtracking: stay positive and decrease f (Armijo)
                candidate = w - t * step
                if (candidate > 0).all():
                    new_value = f(candidate)
                    if new_value <= value - 0.25 * t * decrement2 or t < 1e-12:
                        break
                t *= 0.5
            w, value = candidate, new_value
        return w
