"""Dynamic weight average (DWA): weight each loss by how slowly it has been falling.

Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019:

    w_i(t) = softmax_i(r(t−1) / T),   r_i(t−1) = L_i(t−1) / L_i(t−2),

with temperature T = 2 (the paper's value; larger T → closer to equal weights). A loss whose
ratio is near 1 (stalled) gets more weight than one that is dropping fast. The paper multiplies
by the number of tasks K so the weights sum to K; here they sum to 1, the scale of linear
scalarization's mean, so that DWA with equal ratios *is* the mean and learning rates carry over.

The paper's L(t) is an epoch average; :meth:`observe` is called per optimizer step, so
``period`` observations are averaged into one history entry (1: per step). Until two entries
exist the weights are equal. Not preference-based: α is ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from align.mograd.base import LossAggregator
from align.mograd.registry import register_aggregator
from align.mograd.state import ObjectiveState


@register_aggregator("dwa")
class DynamicWeightAverage(ObjectiveState, LossAggregator):
    """``Σ_i softmax(r / T)_i L_i`` with r the ratio of the last two averaged losses.

    Args:
        temperature: T > 0 (default 2, as in the paper).
        period: number of :meth:`observe` calls averaged into one history entry.

    The history (last two averaged loss vectors) and the partial average are buffers, so a
    resumed run continues with the same weights.
    """

    def __init__(self, temperature: float = 2.0, period: int = 1) -> None:
        super().__init__()
        if not (isinstance(temperature, int | float) and 0 < temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if not (isinstance(period, int) and period >= 1):
            raise ValueError(f"period must be an integer >= 1, got {period!r}")
        self.temperature = float(temperature)
        self.period = period
        float64 = {"dtype": torch.float64}
        # history[0] is L(t−2), history[1] is L(t−1); entries counts how many are filled.
        self.register_buffer("history", torch.empty(0, **float64))
        self.register_buffer("entries", torch.zeros((), dtype=torch.long))
        self.register_buffer("period_sum", torch.empty(0, **float64))
        self.register_buffer("period_count", torch.zeros((), dtype=torch.long))

    def current_weights(self, m: int) -> Tensor:
        """The weights the next :meth:`combine` uses (float64, summing to 1)."""
        if int(self.entries) < 2:
            return torch.full((m,), 1.0 / m, dtype=torch.float64, device=self.history.device)
        # A loss that reached exactly 0 has nothing left to balance: its ratio counts as 1.
        previous, last = self.history[0], self.history[1]
        ratio = torch.where(previous > 0, last / previous.clamp_min(1e-30), torch.ones_like(last))
        return torch.softmax(ratio / self.temperature, dim=0)

    def combine(self, losses: Tensor, preference: Tensor | None) -> Tensor:
        weights = self.current_weights(losses.numel()).to(losses)
        if weights.numel() != losses.numel():
            raise ValueError(
                f"DWA has a history for {weights.numel()} objectives, got {losses.numel()} losses"
            )
        self.last_weights = weights.detach()
        return (weights * losses).sum()

    def observe(self, losses: Tensor) -> None:
        losses = losses.detach().to(torch.float64).reshape(-1)
        m = losses.numel()
        total = self._size_buffer("period_sum", (m,), 0.0, losses.device)
        history = self._size_buffer("history", (2, m), 0.0, losses.device)
        total += losses.to(total.device)
        self.period_count += 1
        if int(self.period_count) == self.period:
            history[0] = history[1]
            history[1] = total / self.period
            total.zero_()
            self.period_count.zero_()
            self.entries.copy_(torch.clamp(self.entries + 1, max=2))
