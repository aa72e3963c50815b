"""Linear scalarization ``Σ α_i L_i`` (PARM's and Panacea's default)."""

from __future__ import annotations

from torch import Tensor

from align.mograd.base import LossAggregator
from align.mograd.registry import register_aggregator


@register_aggregator("linear", "ls")
class LinearScalarization(LossAggregator):
    """``Σ α_i L_i``; without α, the plain mean of the losses (equal weights)."""

    preference_aware = True

    def combine(self, losses: Tensor, preference: Tensor | None) -> Tensor:
        weights = (
            preference if preference is not None else losses.new_full(losses.shape, 1 / len(losses))
        )
        self.last_weights = weights.detach()
        return (weights * losses).sum()
