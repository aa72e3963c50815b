"""Penalty-based boundary intersection (PBI) ``d_1 + θ d_2`` along the preference direction.

Zhang & Li (IEEE TEC 2007), "MOEA/D: a multiobjective evolutionary algorithm based on
decomposition", Section II-C; torchjd's ``scalarization.PBI`` (same formula and constant).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from align.mograd.base import LossAggregator
from align.mograd.registry import register_aggregator

#: Under the square root of d_2, so that its gradient stays finite on the ray (torchjd's).
_EPSILON = 1e-12


@register_aggregator("pbi")
class PBI(LossAggregator):
    """With ``f = L − z`` and the unit preference direction ``ŵ = α / ‖α‖``:

        ``d_1 = fᵀŵ`` (progress along the ray),  ``d_2 = ‖f − d_1 ŵ‖`` (distance to it),
        ``PBI = d_1 + θ d_2``.

    Minimising it drives the losses down along the ray through z with direction α; θ trades
    convergence (d_1) for staying on the ray (d_2). Its gradient is ``ŵ + θ (f − d_1 ŵ) / d_2``.

    Args:
        theta: θ ≥ 0 (5, the paper's; 0 is the plain projection on the ray).
        ideal: z, a number or one per objective (0: a lower bound for non-negative losses).
    """

    uses_preference = True

    def __init__(self, theta: float = 5.0, ideal: float | Sequence[float] = 0.0) -> None:
        super().__init__()
        if not (isinstance(theta, int | float) and 0 <= theta < float("inf")):
            raise ValueError(f"PBI: theta must be a finite number >= 0, got {theta!r}")
        self.theta = float(theta)
        self.ideal = torch.as_tensor(ideal, dtype=torch.float64)
        if self.ideal.ndim > 1 or not torch.isfinite(self.ideal).all():
            raise ValueError(f"PBI: ideal must be finite numbers, got {ideal!r}")

    def combine(self, losses: Tensor, preference: Tensor | None) -> Tensor:
        ideal = self.ideal.to(losses)
        if ideal.ndim == 1 and ideal.numel() != losses.numel():
            raise ValueError(f"PBI: {ideal.numel()} ideal values for {losses.numel()} objectives")
        if not float(preference.sum()) > 0:
            raise ValueError("PBI: the preference must not be all zeros")
        f = losses - ideal
        direction = preference / preference.norm()
        d1 = f @ direction
        perpendicular = f - d1 * direction
        d2 = torch.sqrt(perpendicular @ perpendicular + _EPSILON)
        self.last_weights = (direction + self.theta * perpendicular / d2).detach()
        return d1 + self.theta * d2
