"""Uncertainty weighting: learn one log-variance per loss alongside the model.

Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
Geometry and Semantics", CVPR 2018. Each loss is read as a Gaussian likelihood with its own
noise σ_i²; with ``s_i = log σ_i²`` (learnt in log space so σ² stays positive):

    Σ_i ½ exp(−s_i) L_i + ½ s_i.

For fixed losses the optimum is ``s_i = log L_i``, i.e. weight ``1 / (2 L_i)``: each loss is
scaled to the same size. The ``½ s_i`` term stops the trivial s → ∞. (The paper uses
``1/σ²`` for classification losses; we use the regression form for all, as LibMTL does.)

The log-variances are ``nn.Parameter``s: **the optimizer must include
``aggregator.parameters()``** (e.g. ``AdamW([*model.parameters(), *aggregator.parameters()])``),
or they never move and this is a fixed weighting. That is why the number of objectives is
required up front: the parameters must exist before the optimizer is built.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from align.mograd.base import LossAggregator
from align.mograd.registry import register_aggregator


@register_aggregator("uncertainty", "uw")
class UncertaintyWeighting(LossAggregator):
    """``Σ_i ½ exp(−s_i) L_i + ½ s_i`` with learnable ``s = log σ²`` (initialised to 0).

    ``last_weights`` is ``½ exp(−s)``, the factor each loss's gradient is multiplied by.
    """

    def __init__(self, num_objectives: int | None = None) -> None:
        super().__init__()
        if not (isinstance(num_objectives, int) and num_objectives >= 1):
            raise ValueError(
                f"uncertainty weighting needs num_objectives=m >= 1: its log-variances must exist "
                f"before the optimizer is built, got {num_objectives!r}"
            )
        self.log_variances = nn.Parameter(torch.zeros(num_objectives))

    def combine(self, losses: Tensor, preference: Tensor | None) -> Tensor:
        if losses.numel() != self.log_variances.numel():
            raise ValueError(
                f"uncertainty weighting was built for {self.log_variances.numel()} objectives, "
                f"got {losses.numel()} losses"
            )
        log_var = self.log_variances.to(losses.dtype)
        precision = 0.5 * torch.exp(-log_var)
        self.last_weights = precision.detach()
        return (precision * losses + 0.5 * log_var).sum()
