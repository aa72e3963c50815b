"""Linear weight interpolation — rewarded soups (Ramé et al., NeurIPS 2023).

    θ(α) = Σ_k α_k θ_k

Fine-tune one model per reward from one initialisation, then move along the preference by
interpolating weights. No base model: the weights themselves are averaged. With Σ α_k = 1 this
equals task arithmetic with λ = 1, whatever the base.
"""

from __future__ import annotations

from torch import Tensor

from align.merging.base import weighted_sum
from align.merging.engine import MergeMethod
from align.merging.registry import register_merge_method


@register_merge_method("linear", "rewarded_soups")
class Linear(MergeMethod):
    """Σ_k α_k θ_k (rewarded soups): weights interpolated, no base model."""

    needs_base = False
    options = {}

    def prepare(self, name: str, tensors: Tensor, base: Tensor | None) -> Tensor:
        return tensors

    def apply(self, prepared: Tensor, weights: Tensor) -> Tensor:
        return weighted_sum(weights, prepared)
