"""COSMOS: linear scalarization plus a cosine pull of the loss vector towards the preference.

Ruchte & Grabocka (ICDM 2021), "Scalable Pareto front approximation for deep multi-objective
learning", Equation 4; torchjd's ``scalarization.COSMOS`` (same formula).
"""

from __future__ import annotations

import torch
from torch import Tensor

from align.mograd.base import LossAggregator
from align.mograd.registry import register_aggregator

#: The norm floor of ``torch.nn.functional.cosine_similarity`` (what torchjd uses).
_EPSILON = 1e-8


@register_aggregator("cosmos")
class COSMOS(LossAggregator):
    """``Σ_i α_i L_i − λ cos(α, L)``, ``cos(α, L) = αᵀL / (‖α‖ ‖L‖)``.

    The linear term makes progress; the cosine rewards a loss vector that points along α, which
    spreads the solutions over the front when α varies (the paper also feeds α to the model, as
    align's preference-aware adapters do). Its gradient is
    ``α − λ (α / (‖α‖‖L‖) − cos(α, L) L / ‖L‖²)``.

    Args:
        lambda_: λ ≥ 0 (1 here; torchjd has no default, the paper uses 0.01 to 8 by dataset;
            0 is linear scalarization). The cosine is scale-free while Σ α_i L_i is not, so λ is
            in loss units.
    """

    uses_preference = True

    def __init__(self, lambda_: float = 1.0) -> None:
        super().__init__()
        if not (isinstance(lambda_, int | float) and 0 <= lambda_ < float("inf")):
            raise ValueError(f"COSMOS: lambda_ must be a finite number >= 0, got {lambda_!r}")
        self.lambda_ = float(lambda_)

    def combine(self, losses: Tensor, preference: Tensor | None) -> Tensor:
        a_norm = preference.norm().clamp_min(_EPSILON)
        l_norm = losses.norm().clamp_min(_EPSILON)
        cosine = (preference @ losses) / (a_norm * l_norm)
        with torch.no_grad():
            pull = preference / (a_norm * l_norm) - cosine * losses / l_norm**2
            self.last_weights = (preference - self.lambda_ * pull).detach()
        return (preference * losses).sum() - self.lambda_ * cosine
