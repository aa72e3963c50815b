"""EPO: exact Pareto optimal search along a preference ray.

Mahapatra & Rajan (ICML 2020), "Multi-task learning with user preferences: gradient descent
with controlled ascent in Pareto optimization".
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linprog
from torch import Tensor

from align.mograd.aggregators.solvers import as_float64, min_norm_weights, normalised, to_weights
from align.mograd.base import GradientAggregator
from align.mograd.registry import register_aggregator


@register_aggregator("epo")
class EPO(GradientAggregator):
    """Steers the losses onto the ray ``α_1 L_1 = α_2 L_2 = … = α_m L_m`` and then down it.

    With ``l̂ = α⊙L / Σ α_j L_j``, the non-uniformity is ``μ = KL(l̂ ‖ 1/m) = Σ l̂_i log(m l̂_i)``
    (zero exactly on the ray) and the adjustment ``a = α ⊙ (log(m l̂) − μ)`` is ``∇_L μ`` up to a
    positive factor. With ``C = G`` (``(Cβ)_i = g_i · d`` is the first-order decrease of L_i under
    ``d = Σ β_i g_i``), the weights ``β ∈ Δ`` solve one linear program:

    * balance mode (``μ > eps``): maximise ``aᵀCβ`` (fastest decrease of μ) subject to
      ``(Cβ)_i ≥ (Ca)_i`` for the objectives the anchor ``Σ a_j g_j`` would not decrease
      (``(Ca)_i ≤ 0``), and ``(Cβ)_j ≥ 0`` for the worst-off objectives ``j ∈ argmax α_j L_j``
      (which must not get worse); if every ``(Ca)_i ≤ 0``, ``Cβ ≥ 0``;
    * descent mode (``μ ≤ eps``, on the ray): maximise ``1ᵀCβ`` subject to ``Cβ ≥ 0`` (every loss
      decreases) and ``aᵀCβ ≥ min(max_i (Ca)_i, 0)`` (the ray is not left faster than needed).

    When a program is infeasible its constraints are relaxed in that order (descent keeps
    ``Cβ ≥ 0``, always feasible: the MGDA weights satisfy it). Needs the losses, nonnegative
    (EPO balances α_i L_i; shift losses that can be negative by a lower bound), and α. Weights
    are invariant to scaling J. Ties between optimal vertices of the LP are broken by the solver
    (HiGHS), so permuting the objectives may pick another optimal β.

    Args:
        eps: the non-uniformity below which the losses count as on the ray (the paper's code
            uses 1e-4 as well).
    """

    uses_preference = True
    uses_losses = True

    def __init__(self, eps: float = 1e-4) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"EPO: eps must be > 0, got {eps}")
        self.eps = float(eps)
        #: "balance" or "descent": the mode of the last call (for logging).
        self.last_mode: str | None = None

    def compute_weights(
        self, gram: Tensor, losses: Tensor | None, preference: Tensor | None
    ) -> Tensor:
        c, _ = normalised(as_float64(gram))  # LP solutions are invariant to scaling C
        m = c.shape[0]
        values = losses.double().cpu().numpy()
        if values.shape != (m,):
            raise ValueError(f"EPO: expected {m} losses, got shape {values.shape}")
        if (values < 0).any():
            raise ValueError(
                f"EPO balances α_i L_i and needs nonnegative losses, got {values.tolist()}; "
                f"shift them by a lower bound"
            )
        r = preference.double().cpu().numpy()
        a, mu, rl = _adjustments(values, r)
        ca = c @ a
        if mu > self.eps:
            self.last_mode = "balance"
            worst = rl >= rl.max()
            if (ca > 0).any():
                keep = (ca <= 0) | worst
                rhs = np.where(worst, 0.0, ca)
                attempts = [(keep, rhs), (worst, np.zeros(m)), (None, None)]
            else:
                attempts = [(np.ones(m, dtype=bool), np.zeros(m)), (None, None)]
            for keep, rhs in attempts:
                beta = _simplex_lp(ca, c, keep, rhs)
                if beta is not None:
                    break
        else:
            self.last_mode = "descent"
            floor = min(float(ca.max()), 0.0)
            beta = _simplex_lp(c.sum(axis=0), c, np.ones(m, dtype=bool), np.zeros(m), ca, floor)
            if beta is None:
                beta = _simplex_lp(c.sum(axis=0), c, np.ones(m, dtype=bool), np.zeros(m))
        if beta is None:  # not reached in exact arithmetic; a common descent point is safe
            beta = min_norm_weights(c)
        return to_weights(beta, gram)


def _adjustments(losses: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """``a = r ⊙ (log(m l̂) − μ)``, ``μ = KL(l̂ ‖ 1/m)`` and ``r ⊙ L``."""
    m = losses.shape[0]
    rl = r * losses
    total = rl.sum()
    if total <= 0:  # every weighted loss is 0: already "uniform"
        return np.zeros(m), 0.0, rl
    share = rl / total
    positive = share > 0
    mu = float(np.sum(share[positive] * np.log(m * share[positive])))
    # A zero share (L_i = 0) gets a large finite pull instead of log 0; α_i = 0 gets none.
    a = np.where(r > 0, r * (np.log(np.maximum(m * share, 1e-300)) - mu), 0.0)
    return a, mu, rl


def _simplex_lp(
    objective: np.ndarray,
    c: np.ndarray,
    keep: np.ndarray | None,
    rhs: np.ndarray | None,
    extra_row: np.ndarray | None = None,
    extra_floor: float = 0.0,
) -> np.ndarray | None:
    """``argmax objectiveᵀβ`` over ``β ∈ Δ`` with ``(Cβ)_i ≥ rhs_i`` for i in ``keep`` (and
    ``extra_rowᵀβ ≥ extra_floor``); None when infeasible."""
    m = c.shape[0]
    rows, bounds = [], []
    if keep is not None and keep.any():
        rows.append(-c[keep])
        bounds.append(-rhs[keep])
    if extra_row is not None:
        rows.append(-extra_row[None, :])
        bounds.append(np.array([-extra_floor]))
    result = linprog(
        -objective,
        A_ub=np.vstack(rows) if rows else None,
        b_ub=np.concatenate(bounds) if bounds else None,
        A_eq=np.ones((1, m)),
        b_eq=np.ones(1),
        bounds=(0, None),
        method="highs",
    )
    if result.status != 0 or result.x is None:
        return None
    beta = np.maximum(result.x, 0.0)
    return beta / beta.sum()
