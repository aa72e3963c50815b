"""Nash-MTL: the Nash bargaining solution of the objectives over the update direction.

Navon et al. (ICML 2022), "Multi-task learning as a bargaining game".
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from align.mograd.aggregators.solvers import as_float64, definite_part, to_weights
from align.mograd.base import GradientAggregator
from align.mograd.registry import register_aggregator


@register_aggregator("nash_mtl", "nashmtl")
class NashMTL(GradientAggregator):
    """``d = Σ α_i g_i`` with ``α > 0`` solving ``G α = 1/α`` (elementwise), i.e.
    ``g_i · d = 1/α_i``: every objective decreases, and the product of the gains is maximal.

    Then ``‖d‖² = αᵀGα = m`` whatever the gradients: scaling J by c scales the weights by 1/c
    and leaves ``d`` unchanged; step sizes come from the learning rate (the paper's code, and
    torchjd, also clip ``‖d‖`` to ``max_norm = 1``, which with m ≥ 2 objectives makes ``d`` a unit
    vector; pass ``max_norm=1.0`` for that). The weights follow permutations of the objectives.

    Solver: ``G α = 1/α`` is the stationarity condition of the strictly convex
    ``f(α) = ½ αᵀGα − Σ log α_i``, which is self-concordant, so damped Newton converges from any
    positive start and stays positive (Boyd & Vandenberghe §9.6); it replaces the paper's
    sequence of cvxpy problems and needs no warm start (this aggregator is stateless). It runs on
    ``G / ‖G‖_F`` (as the paper's code does, for conditioning) and rescales: if
    ``(G/N) β = 1/β`` then ``α = β / √N``.

    A solution exists exactly when zero is not in the convex hull of the gradients (then MGDA's
    d ≠ 0); otherwise (a zero gradient, opposed gradients) f is unbounded below along the
    vanishing combination. ``reg_eps`` adds
    ``reg_eps · I`` to the normalised G so that the weights stay finite (of order
    ``1/√reg_eps`` along that combination, which moves ``d`` by nothing), at the price of a bias
    of order ``√reg_eps`` in ``d`` there (it may then conflict with a gradient by that much); a
    zero gradient gets weight 0 outright.

    Args:
        reg_eps: ridge on the normalised Gram (see above).
        max_norm: if set, ``α`` is rescaled so that ``‖d‖ ≤ max_norm`` (the paper's code and
            torchjd clip at 1.0; off by default here, where clipping belongs to the trainer).
        tol, max_iters: Newton stops when the squared Newton decrement is below ``tol``.
    """

    def __init__(
        self,
        reg_eps: float = 1e-10,
        max_norm: float | None = None,
        tol: float = 1e-20,
        max_iters: int = 100,
    ) -> None:
        super().__init__()
        if not reg_eps > 0:
            raise ValueError("Nash-MTL: reg_eps must be > 0 (it keeps the weights finite)")
        if max_norm is not None and not max_norm > 0:
            raise ValueError("Nash-MTL: max_norm must be > 0 or None")
        if not tol > 0 or max_iters < 1:
            raise ValueError("Nash-MTL: tol must be > 0 and max_iters >= 1")
        self.reg_eps = reg_eps
        self.max_norm = max_norm
        self.tol = tol
        self.max_iters = int(max_iters)

    def compute_weights(
        self, gram: Tensor, losses: Tensor | None, preference: Tensor | None
    ) -> Tensor:
        g = as_float64(gram)
        m = g.shape[0]
        weights = np.zeros(m)
        # An indefinite G would leave f unbounded below: its PSD part plus a ridge instead.
        part = definite_part(g, self.reg_eps)
        if part is None:
            return to_weights(weights, gram)
        alive, h, frobenius = part
        weights[alive] = self._solve(h) / np.sqrt(frobenius)
        if self.max_norm is not None:
            norm = float(np.sqrt(max(weights @ g @ weights, 0.0)))
            if norm > self.max_norm:
                weights *= self.max_norm / norm
        return to_weights(weights, gram)

    def _solve(self, h: np.ndarray) -> np.ndarray:
        """Damped Newton for ``min ½ αᵀHα − Σ log α`` (H positive definite)."""
        k = h.shape[0]
        # Start on the best point of the ray t·1: t² 1ᵀH1 = k.
        alpha = np.full(k, np.sqrt(k / h.sum()) if h.sum() > 0 else 1.0)
        for _ in range(self.max_iters):
            grad = h @ alpha - 1.0 / alpha
            hessian = h + np.diag(1.0 / alpha**2)
            step = np.linalg.solve(hessian, grad)
            decrement2 = float(grad @ step)
            if decrement2 <= self.tol or np.abs(step).max() <= 1e-15 * np.abs(alpha).max():
                break
            # A damped step stays inside the Dikin ellipsoid, hence α > 0; pure Newton near the end.
            decrement = np.sqrt(decrement2)
            alpha = alpha - (step / (1.0 + decrement) if decrement > 0.25 else step)
        return alpha
