"""DualProj: project the (preference-weighted) mean gradient onto the dual cone of the gradients.

Lopez-Paz & Ranzato (NeurIPS 2017), "Gradient episodic memory for continual learning",
Equation 11 (GEM's projection); torchjd's ``DualProj``.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from align.mograd.aggregators.solvers import as_float64, dual_cone_weights, to_weights
from align.mograd.base import GradientAggregator
from align.mograd.registry import register_aggregator


@register_aggregator("dualproj")
class DualProj(GradientAggregator):
    """``d = π(Jᵀu)``, with ``u = p`` (the preference vector; default ``1/m``, the mean) and ``π``
    the projection onto the dual cone ``{x : g_j · x ≥ 0 ∀ j}``.

    On the Gram, ``π(Jᵀu) = Jᵀv`` with ``v = argmin_{v ≥ u} vᵀGv`` (Quinton & Rey 2024,
    Proposition 1): one nonnegative QP, solved exactly by the active-set method UPGrad uses.
    UPGrad projects each ``p_i g_i`` separately and sums; DualProj projects their sum once.

    Promises: ``d`` conflicts with no gradient (``g_j · d ≥ 0``); weights are invariant to
    scaling J; the direction follows permutations of the objectives. When ``preference=α`` is
    passed it is used as ``p`` (torchjd's ``pref_vector``).
    """

    preference_aware = True

    def compute_weights(
        self, gram: Tensor, losses: Tensor | None, preference: Tensor | None
    ) -> Tensor:
        g = as_float64(gram)
        m = g.shape[0]
        u = np.full(m, 1.0 / m) if preference is None else preference.double().cpu().numpy()
        return to_weights(dual_cone_weights(g, u), gram)
