"""Random loss weighting (RLW): fresh random weights at every step.

Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
Multi-Task Learning", TMLR 2022: ``w = softmax(λ̃)``, ``λ̃ ~ N(0, I)``, drawn anew for every
call. Surprisingly competitive, and the baseline a balancing method has to beat.

The draws are reproducible and resumable: draw t comes from a generator seeded with
``(seed, t)`` and the pair is kept in buffers, so a run restored from ``state_dict`` continues
with the same weights it would have drawn (no generator state to pickle). Not
preference-based: α is ignored.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from align.mograd.base import LossAggregator
from align.mograd.registry import register_aggregator


@register_aggregator("random_weighting", "rw", "rlw")
class RandomWeighting(LossAggregator):
    """``Σ_i w_i L_i`` with ``w = softmax(N(0, I))`` redrawn at every call."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        if not (isinstance(seed, int) and seed >= 0):
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.long))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    def draw(self, m: int) -> Tensor:
        """The next weights (float64, summing to 1); advances the draw counter."""
        # A generator per draw, keyed by (seed, t): numpy's SeedSequence mixes the pair, so
        # neighbouring t give unrelated draws.
        rng = np.random.default_rng([int(self.seed), int(self.draws)])
        self.draws += 1
        return torch.softmax(torch.from_numpy(rng.standard_normal(m)), dim=0)

    def combine(self, losses: Tensor, preference: Tensor | None) -> Tensor:
        weights = self.draw(losses.numel()).to(losses)
        self.last_weights = weights.detach()
        return (weights * losses).sum()
