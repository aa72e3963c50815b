"""UPGrad: average of the projections of each gradient onto the dual cone of all gradients.

Quinton & Rey (2024), "Jacobian descent for multi-objective optimization" (torchjd's UPGrad).
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from align.mograd.aggregators.solvers import as_float64, dual_cone_weights, to_weights
from align.mograd.base import GradientAggregator
from align.mograd.registry import register_aggregator


@register_aggregator("upgrad")
class UPGrad(GradientAggregator):
    """``d = Σ_i π(p_i g_i)`` where ``π`` projects onto the dual cone ``{x : g_j · x ≥ 0 ∀ j}``
    and ``p`` is the preference vector (default ``1/m``, i.e. the mean of the projections).

    On the Gram, ``π(Jᵀu) = Jᵀv`` with ``v = argmin_{v ≥ u} vᵀGv`` (the paper's Proposition 1),
    one small nonnegative QP per objective, solved exactly by an active-set method. The weights
    are ``Σ_i v^{(i)}`` for ``u = p_i e_i``.

    Promises (the paper's): ``d`` conflicts with no gradient (``g_j · d ≥ 0``); weights are
    invariant to scaling J (``d`` scales linearly) and follow permutations of the objectives.

    When ``preference=α`` is passed, it is used as ``p`` (torchjd's ``pref_vector``); UPGrad does
    not require one.
    """

    preference_aware = True

    def compute_weights(
        self, gram: Tensor, losses: Tensor | None, preference: Tensor | None
    ) -> Tensor:
        g = as_float64(gram)
        m = g.shape[0]
        pref = np.full(m, 1.0 / m) if preference is None else preference.double().cpu().numpy()
        weights = np.zeros(m)
        for i in range(m):
            if pref[i] == 0.0:  # the projection of 0 is 0
                continue
            u = np.zeros(m)
            u[i] = pref[i]
            weights += dual_cone_weights(g, u)
        return to_weights(weights, gram)
