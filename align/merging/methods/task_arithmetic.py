"""Task arithmetic (Ilharco et al., ICLR 2023).

    θ(α) = θ_base + λ Σ_k α_k τ_k,    τ_k = θ_k − θ_base

The task vector τ_k is what fine-tuning for objective k added to the base; α weighs them and λ
(``lambda``, default 1) scales their sum. λ = 1 with α on the simplex is linear interpolation;
λ > 1 extrapolates past it.
"""

from __future__ import annotations

from torch import Tensor

from align.merging.base import check_number, task_vectors, weighted_sum
from align.merging.engine import MergeMethod
from align.merging.registry import register_merge_method


@register_merge_method("task_arithmetic")
class TaskArithmetic(MergeMethod):
    """θ_base + λ Σ_k α_k (θ_k − θ_base)."""

    options = {"lambda": 1.0}

    def check_options(self) -> None:
        self.params["lambda"] = check_number(self.params["lambda"], "lambda")

    def prepare(self, name: str, tensors: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor]:
        return base, task_vectors(tensors, base)

    def apply(self, prepared: tuple[Tensor, Tensor], weights: Tensor) -> Tensor:
        base, tau = prepared
        return base + self.params["lambda"] * weighted_sum(weights, tau)
