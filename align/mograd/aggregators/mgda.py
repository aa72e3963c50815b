"""MGDA: the min-norm point of the convex hull of the gradients.

Désidéri (2012), "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization";
Sener & Koltun (NeurIPS 2018), "Multi-task learning as multi-objective optimization".
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from align.mograd.aggregators.solvers import (
    as_float64,
    frank_wolfe_min_norm,
    min_norm_weights,
    to_weights,
)
from align.mograd.base import GradientAggregator
from align.mograd.registry import register_aggregator

_NORMALISATIONS = ("none", "l2", "loss", "loss+")
_SOLVERS = ("active_set", "frank_wolfe")


@register_aggregator("mgda")
class MGDA(GradientAggregator):
    """``w = argmin_{w ∈ Δ} ‖Σ w_i g_i‖² = argmin_{w ∈ Δ} wᵀGw``, ``d = Σ w_i g_i``.

    ``d`` is a common descent direction (``g_i · d ≥ ‖d‖² ≥ 0`` for every i), and ``d = 0``
    exactly at Pareto-stationary points. It is unique even when ``w`` is not (dependent
    gradients), and invariant to the order of the objectives; weights are invariant to scaling J.

    Args:
        normalization: LibMTL's gradient normalisations, applied before the min-norm problem:
            ``g_i / n_i`` with ``n_i`` = 1 ("none"), ``‖g_i‖`` ("l2"), ``L_i`` ("loss") or
            ``L_i ‖g_i‖`` ("loss+"); on the Gram that is ``G_ij / (n_i n_j)``. The returned weights
            are for the *un-normalised* gradients (``w_i / n_i``), so ``d`` is the min-norm point
            of the normalised hull — still a common descent direction. "loss" and "loss+" need
            ``losses=`` (positive). A zero gradient keeps ``n_i = 1`` under "l2".
        solver: "active_set" (default): an exact active-set solve (:func:`nonneg_qp`);
            "frank_wolfe": Sener & Koltun's Algorithm 2 from the best vertex/edge, stopped when
            the step is below ``tol`` or after ``max_iters`` steps. Two objectives always use the
            closed form.
        tol, max_iters: Frank-Wolfe's stopping rule (ignored by "active_set").
    """

    def __init__(
        self,
        normalization: str = "none",
        solver: str = "active_set",
        tol: float = 1e-6,
        max_iters: int = 250,
    ) -> None:
        super().__init__()
        if normalization not in _NORMALISATIONS:
            raise ValueError(f"MGDA: normalization must be one of {_NORMALISATIONS}")
        if solver not in _SOLVERS:
            raise ValueError(f"MGDA: solver must be one of {_SOLVERS}")
        if not tol > 0 or max_iters < 1:
            raise ValueError("MGDA: tol must be > 0 and max_iters >= 1")
        self.normalization = normalization
        self.solver = solver
        self.tol = tol
        self.max_iters = int(max_iters)
        # The instance attribute shadows the class's: the base then checks and passes losses.
        self.uses_losses = normalization in ("loss", "loss+")

    def compute_weights(
        self, gram: Tensor, losses: Tensor | None, preference: Tensor | None
    ) -> Tensor:
        g = as_float64(gram)
        scale = self._scales(g, losses)
        g = g / np.outer(scale, scale)
        if self.solver == "frank_wolfe":
            w = frank_wolfe_min_norm(g, tol=self.tol, max_iters=self.max_iters)
        else:
            w = min_norm_weights(g)
        return to_weights(w / scale, gram)

    def _scales(self, g: np.ndarray, losses: Tensor | None) -> np.ndarray:
        m = g.shape[0]
        norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
        if self.normalization == "none":
            return np.ones(m)
        if self.normalization == "l2":
            return np.where(norms > 0, norms, 1.0)
        values = losses.double().cpu().numpy()
        if values.shape != (m,):
            raise ValueError(f"MGDA: expected {m} losses, got shape {values.shape}")
        if (values <= 0).any():
            raise ValueError(
                f"MGDA: normalization={self.normalization!r} divides by the losses, which must "
                f"be > 0; got {values.tolist()}"
            )
        if self.normalization == "loss":
            return values
        return np.where(norms > 0, values * norms, values)
