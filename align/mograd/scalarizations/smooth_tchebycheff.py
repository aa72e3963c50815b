"""Smooth Tchebycheff scalarization ``μ log Σ_i exp(α_i (L_i − z_i) / μ)``.

Lin, Zhang, Liu, Zhang & Kwong, "Smooth Tchebycheff Scalarization for Multi-Objective
Optimization", ICML 2024. The log-sum-exp is a smooth upper bound of the Tchebycheff max:

    TCH ≤ STCH ≤ TCH + μ log m,

so STCH → TCH as μ → 0. Its gradient is a softmax mix ``Σ_i softmax(α (L − z)/μ)_i α_i ∇L_i``
instead of the max's one-hot pick, which removes Tchebycheff's zig-zag; the paper shows every
minimiser is (weakly) Pareto optimal and, like Tchebycheff, reaches non-convex parts of the
front that linear scalarization cannot.

μ defaults to 0.01, the value of the paper's Pareto-set-learning code (Xi-L/STCH), where the
objectives are normalised to about [0, 1] (ideal 0, nadir 1) — the scale of α_i (L_i − z_i) for
losses of order 1, and of the nadir-normalised terms. LibMTL's STCH uses μ = 1 (its default,
also in the paper's multi-task code), but on log-normalised losses ``log(L_i / n_i)`` and without
α; on raw losses μ = 1 would be close to an equal-weight mean. Larger μ is smoother but biased
towards linear scalarization (on a concave front such as ZDT2 that pulls solutions towards the
ends); smaller μ approaches Tchebycheff. The reference points (ideal z, nadir normalisation and
its warm-up) are Tchebycheff's, see ``tchebycheff.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from align.mograd.registry import register_aggregator
from align.mograd.scalarizations.tchebycheff import Tchebycheff


@register_aggregator("smooth_tchebycheff", "stch")
class SmoothTchebycheff(Tchebycheff):
    """``μ log Σ_i exp(α_i (L_i − z_i) / (μ (n_i − z_i)))``; options as :class:`Tchebycheff`
    plus the smoothing ``mu`` > 0."""

    def __init__(
        self,
        ideal: float | Sequence[float] | str = 0.0,
        *,
        mu: float = 0.01,
        margin: float = 1e-2,
        nadir: float | Sequence[float] | str | None = None,
        warmup_steps: int = 100,
    ) -> None:
        super().__init__(ideal, margin=margin, nadir=nadir, warmup_steps=warmup_steps)
        if not (isinstance(mu, int | float) and mu > 0 and mu < float("inf")):
            raise ValueError(f"mu must be a finite number > 0, got {mu!r}")
        self.mu = float(mu)

    def reduce(self, terms: Tensor) -> tuple[Tensor, Tensor]:
        # logsumexp subtracts the max internally: no overflow for small μ.
        value = self.mu * torch.logsumexp(terms / self.mu, dim=0)
        return value, torch.softmax(terms.detach() / self.mu, dim=0)
