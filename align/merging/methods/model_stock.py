"""Model stock (Jang et al., ECCV 2024): move from the base towards the models' average by a
ratio set by how much the fine-tuning directions agree.

Per tensor (or per row, ``filter_wise``), with task vectors τ_k = θ_k − θ_base and cos θ the
mean pairwise cosine between them,

    t    = K cos θ / (1 + (K − 1) cos θ)
    θ(α) = t · Σ_k α_k θ_k + (1 − t) · θ_base

Fine-tuned models spread around a centre; the more their directions differ (small cos θ), the
closer to the base the merge stays. The paper (and mergekit's ``model_stock``) averages the
models uniformly: that is α uniform here. A non-uniform α weighs the average; t does not depend
on α. (A negative mean cosine makes t negative or, near cos θ = −1/(K − 1), unbounded; the
formula is applied as it stands, as mergekit does.)
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from align.merging.base import check_bool, task_vectors, weighted_sum
from align.merging.engine import MergeMethod
from align.merging.registry import register_merge_method

_EPS = 1e-8


def model_stock_ratio(tau: Tensor, filter_wise: bool = False) -> Tensor:
    """t = K cos θ / (1 + (K − 1) cos θ) for task vectors ``tau`` (``(K, *shape)``): a scalar, or
    one per row (shape ``(rows, 1)``) when ``filter_wise`` and the tensors are matrices."""
    k = tau.shape[0]
    if k < 2:
        raise ValueError("model stock needs at least two models")
    rows = filter_wise and tau.ndim >= 3
    flat = tau.reshape(k, tau.shape[1], -1) if rows else tau.reshape(k, -1)
    cosines = []
    for i, j in itertools.combinations(range(k), 2):
        a, b = flat[i], flat[j]
        norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
        cosines.append(((a * b).sum(-1) / norms.clamp_min(_EPS)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0)
    ratio = k * cos / (1 + (k - 1) * cos)
    return ratio.reshape(-1, *([1] * (tau.ndim - 2))) if rows else ratio


@register_merge_method("model_stock")
class ModelStock(MergeMethod):
    """t · Σ_k α_k θ_k + (1 − t) θ_base, t from the task vectors' mean pairwise cosine."""

    options = {"filter_wise": False}

    def check_options(self) -> None:
        check_bool(self.params["filter_wise"], "filter_wise")

    def prepare(self, name: str, tensors: Tensor, base: Tensor | None):
        ratio = model_stock_ratio(task_vectors(tensors, base), self.params["filter_wise"])
        return base, tensors, ratio

    def apply(self, prepared, weights: Tensor) -> Tensor:
        base, tensors, ratio = prepared
        return ratio * weighted_sum(weights, tensors) + (1 - ratio) * base
