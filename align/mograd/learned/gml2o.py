"""GML2O: ML2O with a guard that makes the iterates converge to a Pareto-critical point.

Each step computes two candidate directions from the same per-objective gradients ``g_i``:

* the learned one, ``d`` (:class:`~align.mograd.learned.ml2o.ML2O`);
* the baseline ``d*``: the stochastic multi-gradient (MGDA min-norm) direction of the current
  gradients, as in DSSMG. The paper's baseline draws a *growing* sample; an aggregator cannot
  grow the trainer's batch, so the sample is whatever the trainer's batch (or a batch-size
  schedule outside) is — with full gradients, as in the held-out evaluation, it is exact.

**The criterion** (documented choice; the paper's exact test is not public). ``d`` is taken
when it is a common descent direction at least as strong as the baseline's guarantee and not
much longer::

    ⟨d, g_i⟩ ≥ margin · ‖d*‖²  for every i      and      ‖d‖ ≤ max_ratio · ‖d*‖

otherwise ``d*`` is taken. ``d*`` itself satisfies ``⟨d*, g_i⟩ ≥ ‖d*‖²`` (min-norm property)
with ratio 1, so *every* step satisfies the two inequalities with constants
``c = min(margin, 1)`` and ``C = max(max_ratio, 1)``. With L-Lipschitz gradients and a step
``x ← x − η d``, each objective then falls by at least ``η (c − η L C² / 2) ‖d*‖²``; for
``η < 2c / (L C²)`` summing over steps gives ``Σ_k ‖d*_k‖² < ∞``, so ``‖d*_k‖ → 0``: the
Pareto-stationarity measure (the norm of the min-norm element of the gradients' convex hull)
vanishes and every limit point is Pareto-critical. That is the same argument as for MGDA,
which is why the guard compares against it. At a Pareto-critical point (``d* = 0``) only
``d = 0`` passes.

The decision is exposed as ``last_accepted`` and the running ``acceptance_rate`` (its counters
are buffers, saved with ``state_dict``); the trainers log it as ``gml2o/accepted``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from align.mograd.learned.ml2o import ML2O, span_weights
from align.mograd.learned.network import ML2ONet
from align.mograd.registry import register_aggregator


def accepts(
    jacobian: Tensor, update: Tensor, baseline: Tensor, margin: float, max_ratio: float
) -> bool:
    """The guard's test (float64): ``J d ≥ margin ‖d*‖²`` row-wise and ``‖d‖ ≤ max_ratio ‖d*‖``."""
    d, b = update.double(), baseline.double()
    floor = margin * float(b @ b)
    inner = jacobian.double() @ d
    return bool((inner >= floor).all()) and float(d.norm()) <= max_ratio * float(b.norm())


@register_aggregator("gml2o")
class GML2O(ML2O):
    """Guarded ML2O. Args as :class:`ML2O`, plus:

    Args:
        margin: c in ``⟨d, g_i⟩ ≥ c ‖d*‖²`` (0 < c; 1 asks as much as MGDA guarantees).
        max_ratio: C in ``‖d‖ ≤ C ‖d*‖`` (≥ 1).
    """

    def __init__(
        self,
        weights: str | os.PathLike | None = "default",
        *,
        net: ML2ONet | None = None,
        margin: float = 0.5,
        max_ratio: float = 10.0,
        state_dtype: str = "float16",
        chunk_size: int = 65536,
    ) -> None:
        super().__init__(weights, net=net, state_dtype=state_dtype, chunk_size=chunk_size)
        if not margin > 0:
            raise ValueError("GML2O: margin must be > 0")
        if not max_ratio >= 1:
            raise ValueError("GML2O: max_ratio must be >= 1")
        self.margin = float(margin)
        self.max_ratio = float(max_ratio)
        self.register_buffer("accepted", torch.zeros((), dtype=torch.long))
        self.register_buffer("decisions", torch.zeros((), dtype=torch.long))
        #: Whether the last step was the learned one (None before the first step).
        self.last_accepted: bool | None = None

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted learned steps / steps so far (None before the first step)."""
        total = int(self.decisions)
        return None if total == 0 else int(self.accepted) / total

    def compute_update(
        self, jacobian: Tensor, losses: Tensor | None, preference: Tensor | None
    ) -> Tensor:
        proposal = self.propose(jacobian)
        update, baseline = proposal["update"], proposal["baseline"]
        ok = accepts(jacobian, update, baseline, self.margin, self.max_ratio)
        self.last_accepted = ok
        self.decisions += 1
        self.accepted += int(ok)
        if ok:
            self.last_weights = span_weights(jacobian, proposal["gram"], update)
            return update.to(jacobian.dtype)
        self.last_weights = proposal["baseline_weights"]
        return baseline.to(jacobian.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, max_ratio={self.max_ratio}"
