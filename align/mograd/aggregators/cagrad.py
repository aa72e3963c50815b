"""CAGrad: the best worst-case improvement in a ball around the mean gradient.

Liu et al. (NeurIPS 2021), "Conflict-averse gradient descent for multi-task learning".
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from torch import Tensor

from align.mograd.aggregators.solvers import as_float64, min_norm_weights, normalised, to_weights
from align.mograd.base import GradientAggregator
from align.mograd.registry import register_aggregator


@register_aggregator("cagrad")
class CAGrad(GradientAggregator):
    """``d = g₀ + (√φ / ‖g_w‖) g_w`` with ``g₀`` the mean gradient, ``√φ = c ‖g₀‖`` and
    ``w = argmin_{w ∈ Δ} g_w · g₀ + √φ ‖g_w‖`` (the dual of
    ``max_d min_i g_i · d`` s.t. ``‖d − g₀‖ ≤ c ‖g₀‖``); weights ``1/m + (√φ / ‖g_w‖) w``.

    ``c = 0`` is the mean gradient; larger c moves towards the worst-off objective. With
    ``rescale=True`` (the paper's code default) the weights are divided by ``1 + c²``. Weights
    are invariant to scaling J and follow permutations of the objectives.

    If the optimum has ``g_w = 0`` (zero in the hull, and no direction of the ball improves the
    worst objective) the weights are 0: no update, as in torchjd.

    Solver: the inner problem is convex but not smooth where ``g_w = 0``. Using
    ``√q = min_τ q/(2τ) + τ/2``, for a fixed τ it becomes ``min_{w ∈ Δ} g_w · g₀ + √φ‖g_w‖²/(2τ)``:
    the min-norm point of the hull of the shifted gradients ``g_i + (τ/√φ) g₀``, solved exactly.
    Its value is convex in τ (a perspective), so a bounded 1-D search over
    ``τ ∈ (0, max‖g_i‖]`` finds ``τ* = ‖g_w*‖``, then a few fixed-point steps
    ``τ ← ‖g_w(τ)‖`` polish it.
    """

    def __init__(self, c: float = 0.5, rescale: bool = True) -> None:
        super().__init__()
        if not c >= 0:
            raise ValueError(f"CAGrad: c must be >= 0, got {c}")
        self.c = float(c)
        self.rescale = bool(rescale)

    def compute_weights(
        self, gram: Tensor, losses: Tensor | None, preference: Tensor | None
    ) -> Tensor:
        g, trace = normalised(as_float64(gram))
        m = g.shape[0]
        mean = np.full(m, 1.0 / m)
        b = g @ mean  # b_i = g_i · g₀
        radius = self.c * float(np.sqrt(max(mean @ b, 0.0)))  # √φ
        divisor = 1.0 + self.c**2 if self.rescale else 1.0
        if trace == 0.0 or radius <= 1e-12:  # c = 0, or g₀ = 0: plain mean
            return to_weights(mean / divisor, gram)
        w = self._solve(g, b, radius)
        gw_norm = float(np.sqrt(max(w @ g @ w, 0.0)))
        # On the unit-trace Gram, wᵀGw carries rounding of ~1e-16, so norms below ~1e-8 are
        # noise. If zero is in the hull and no w does clearly better than F = 0, then g_w* = 0
        # (the τ search cannot land on τ = 0 exactly); a g_w of noise size has no direction.
        w0 = min_norm_weights(g)
        norm0 = float(np.sqrt(max(w0 @ g @ w0, 0.0)))
        best = float(w @ b) + radius * gw_norm
        if gw_norm <= 1e-7 or (norm0 <= 1e-7 and best >= -1e-7 * radius):
            return to_weights(np.zeros(m), gram)
        return to_weights((mean + (radius / gw_norm) * w) / divisor, gram)

    @staticmethod
    def _solve(g: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
        g0_sq = float(b.mean())

        def inner(tau: float) -> np.ndarray:
            s = tau / radius
            shifted = g + s * (b[:, None] + b[None, :]) + s * s * g0_sq
            return min_norm_weights(shifted)

        def value(tau: float) -> float:
            tau = max(tau, 1e-300)
            w = inner(tau)
            return float(w @ b + radius * ((w @ g @ w) / (2 * tau) + tau / 2))

        tau_max = float(np.sqrt(np.diag(g).max()))
        result = minimize_scalar(
            value, bounds=(0.0, tau_max), method="bounded", options={"xatol": 1e-12 * tau_max}
        )
        tau = float(result.x)
        w = inner(tau)
        for _ in range(20):
            new_tau = float(np.sqrt(max(w @ g @ w, 0.0)))
            if new_tau <= 1e-12 or abs(new_tau - tau) <= 1e-13 * tau_max:
                break
            tau = new_tau
            w = inner(tau)
        return w
