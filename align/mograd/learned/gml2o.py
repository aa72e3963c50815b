"""GML2O: ML2O with a guard that keeps MGDA's convergence argument (see below for its terms).

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

otherwise ``d*`` is taken.

**What is proven, exactly.** ``d*`` passes the test with constants 1 (min-norm property), so
*every* returned direction satisfies, for the gradients ``g_i`` it was given::

    ⟨d, g_i⟩ ≥ c ‖d*‖² for every i,   ‖d‖ ≤ C ‖d*‖,   c = min(margin, 1), C = max(max_ratio, 1)

That is a property of the direction alone; it always holds. The convergence statement built on
it needs, in addition:

1. every ``f_i`` has an L-Lipschitz gradient, and one of them is bounded below;
2. deterministic gradients: ``g_i = ∇f_i(x_k)`` exactly, the gradients the guard tested;
3. plain steps with the returned direction, ``x_{k+1} = x_k − η_k d_k`` — no momentum,
   per-coordinate preconditioning, weight decay or projection;
4. the step bound ``0 < η_min ≤ η_k ≤ η_max < 2c / (L C²)`` — with the defaults (margin 0.5,
   max_ratio 10) ``η < 1 / (100 L)``, a hundred times below MGDA's own bound ``2 / L``. L is
   not known to the method and nothing checks the step against it.

Then the descent lemma gives, for every i, ``f_i(x_{k+1}) ≤ f_i(x_k) − η_k (c − η_k L C²/2)
‖d*_k‖²``: every objective is non-increasing, ``Σ_k ‖d*_k‖² ≤ (f_i(x_0) − inf f_i) /
(η_min (c − η_max L C² / 2)) < ∞``, so ``min_{k<K} ‖d*_k‖² = O(1/K)`` and ``‖d*_k‖ → 0``: the
Pareto-stationarity measure (the norm of the min-norm element of the gradients' convex hull, a
continuous function of x) vanishes and every limit point is Pareto-critical. That is MGDA's own
argument (c = C = 1), which is why the guard compares against it. At a Pareto-critical point
(``d* = 0``) only ``d = 0`` passes.

**What holds in the trainers.** They inject ``d`` as the gradient and step with AdamW (cosine
or linear schedule, warm-up, global-norm clipping at ``max_grad_norm``) on mini-batch
gradients, so assumptions 2–4 do not hold and the convergence statement does not carry over:

* *mini-batches*: the guard tests the batch gradients, so ``d`` is a common descent direction
  of the batch losses, not necessarily of the objectives; ``d*`` is the min-norm element of
  noisy gradients, and ``‖d*‖`` levels off at a noise floor (measured in the README's held-out
  table). DSSMG's growing sample is what restores convergence; a fixed batch size gives none.
* *gradient accumulation*: with ``accumulation="micro"`` GML2O is called once per micro-batch
  (each call tests, and may advance the state on, one micro-batch) and the step's update is
  the sum of k directions, each guarded for its own micro-batch only; with ``"full"`` it is
  called once per optimizer step on the effective batch's mean Jacobian, and the guard holds
  for that batch.
* *global-norm clipping* multiplies ``d`` by a factor in (0, 1]: the direction and both
  inequalities survive; with plain SGD it is a smaller ``η_k``, inside the argument as long
  as the factor stays bounded away from 0 (bounded gradients).
* *schedules*: a schedule is ``η_k``. Warm-up only shortens steps; a decay to 0 (cosine) breaks
  ``η_min > 0`` — with ``Σ η_k = ∞`` one still gets ``Σ η_k ‖d*_k‖² < ∞`` and
  ``liminf ‖d*_k‖ = 0``, and a finite run has no asymptotics anyway.
* *AdamW*: the applied displacement is ``η_k (m̂_k / (√v̂_k + ε) + λ x_k)``, a per-coordinate
  rescaled moving average of past directions plus weight decay, not ``η_k d_k``. A positive
  diagonal rescaling of a common descent direction need not be one when the objectives
  conflict, momentum mixes directions tested at earlier points, and decay pulls towards 0:
  neither the per-step decrease nor ``‖d*‖ → 0`` follows.

What survives all of these is the per-direction property: each direction the optimizer is
handed is a common descent direction of the gradients it was computed from, with
``⟨d, g_i⟩ ≥ c ‖d*‖²`` and ``‖d‖ ≤ C ‖d*‖`` — the kind of input MGDA hands it (c = C = 1).
The guard bounds what the learned part can feed the optimizer; it does not give AdamW on
mini-batches a guarantee that MGDA under AdamW lacks.

**Rejected steps do not advance the recurrent state.** The candidate state is computed in a
separate tensor (``ML2O.propose(commit=False)``; a second copy of the state, kept between
calls as the next candidate's buffer) and committed only with the learned step it produced, so
the network's history holds only the learned steps that were taken. (The guarantee above does not depend on it: it holds
whatever the learned part does.) ``steps`` counts calls, ``accepted`` the learned steps taken.

The decision is exposed as ``last_accepted`` and the running ``acceptance_rate`` (its counters
are buffers, saved with ``state_dict``); the trainers log it as ``gml2o/accepted``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from align.mograd.learned.ml2o import ML2O, gram_lstsq, span_weights
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
        chunk_size: int = 16384,
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
        # The candidate state is committed only with the learned step it produced.
        proposal = self.propose(jacobian, commit=False)
        update, baseline = proposal["update"], proposal["baseline"]
        ok = accepts(jacobian, update, baseline, self.margin, self.max_ratio)
        self._decide(ok, proposal)
        if ok:
            self.last_weights = span_weights(jacobian, proposal["gram"], update)
            return update.to(jacobian.dtype)
        self.last_weights = proposal["baseline_weights"]
        return baseline.to(jacobian.dtype)

    def _decide(self, ok: bool, proposal: dict[str, Tensor]) -> None:
        """Count the decision; commit the candidate state if ``ok``. The state tensor not kept
        (the rejected candidate, or the replaced state) becomes the next call's candidate
        buffer: ``hidden`` is then overwritten by a later step, as ML2O's in-place state is,
        so a snapshot of ``state_dict()`` must be a copy."""
        self.last_accepted = ok
        self.decisions += 1
        self.accepted += int(ok)
        if ok:
            previous = self.hidden
            self.commit(proposal)
            self._spare = previous
        else:
            self._spare = proposal["state"]

    @torch.no_grad()
    def compute_update_sharded(
        self, jacobian: Tensor, gram: Tensor, total: int, all_reduce: Callable[[Tensor], Tensor]
    ) -> Tensor:
        """ZeRO-1/2: the network on this rank's coordinates and state partition; the guard's
        ``J d`` (m numbers) and ``‖d‖²``, ``‖d*‖²`` are sums over the ranks — one all-reduce of
        m + 2 numbers — so every rank takes the same decision."""
        proposal = self.propose(jacobian, commit=False, gram=gram, total=total)
        update, baseline = proposal["update"].double(), proposal["baseline"].double()
        packed = torch.cat(
            [
                jacobian.double() @ update,
                (update @ update).reshape(1),
                (baseline @ baseline).reshape(1),
            ]
        )
        packed = all_reduce(packed)
        m = jacobian.shape[0]
        inner, length2, floor2 = packed[:m], float(packed[m]), float(packed[m + 1])
        ok = bool((inner >= self.margin * floor2).all()) and length2**0.5 <= (
            self.max_ratio * floor2**0.5
        )
        self._decide(ok, proposal)
        if ok:
            self.last_weights = gram_lstsq(proposal["gram"], inner)
            return proposal["update"].to(jacobian.dtype)
        self.last_weights = proposal["baseline_weights"]
        return proposal["baseline"].to(jacobian.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, max_ratio={self.max_ratio}"
