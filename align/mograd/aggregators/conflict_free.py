"""ConFIG: the conflict-free direction with equal cosine to every gradient.

Liu, Chu, Thuerey (ICLR 2025), "ConFIG: Towards conflict-free training of physics informed
neural networks", Equation 2; torchjd's ``ConFIG`` (same semantics).
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from align.mograd.aggregators.solvers import as_float64, to_weights
from align.mograd.base import GradientAggregator
from align.mograd.registry import register_aggregator


@register_aggregator("config")
class ConFIG(GradientAggregator):
    """With unit gradients ``u_i = g_i / ‖g_i‖`` (rows of U), ``b = U⁺ p`` — the direction whose
    inner product with every ``u_i`` is ``p_i``, so equal cosines for ``p = 1`` — and
    ``d = (Σ_i g_i · b̂) b̂`` with ``b̂ = b / ‖b‖``: its length is the sum of the gradients'
    projections on it.

    Gram form: ``U⁺ = Uᵀ (U Uᵀ)⁺`` and ``U Uᵀ = Ĝ = D⁻¹ G D⁻¹`` (``D = diag ‖g_i‖``), so
    ``b = Jᵀ c`` with ``c = D⁻¹ Ĝ⁺ p`` and ``w = c · (1ᵀ G c) / (cᵀ G c)``. Zero gradients get
    weight 0 (torchjd zeroes their unit row).

    Args:
        rcond: eigenvalues of Ĝ below ``rcond · λ_max`` count as zero in its pseudo-inverse.
            The Gram squares the condition number of U, so this cuts singular values of U below
            ``√rcond`` relative; a float32 Jacobian's Gram rounds at about 1e-7 relative, hence
            the default 1e-6 (torchjd's ``pinv`` on U itself cuts at ``max(m, n)·eps``; the two
            agree unless U is that ill-conditioned).

    ``p`` is the preference vector, default all ones (torchjd's); ``preference=α`` is used as
    ``p`` when given (only its direction matters). Weights are invariant to scaling J.
    """

    preference_aware = True

    def __init__(self, rcond: float = 1e-6) -> None:
        super().__init__()
        if not 0 < rcond < 1:
            raise ValueError("ConFIG: rcond must be in (0, 1)")
        self.rcond = float(rcond)

    def compute_weights(
        self, gram: Tensor, losses: Tensor | None, preference: Tensor | None
    ) -> Tensor:
        g = as_float64(gram)
        m = g.shape[0]
        p = np.ones(m) if preference is None else preference.double().cpu().numpy()
        norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
        alive = norms > np.sqrt(np.finfo(np.float64).tiny)
        inverse = np.where(alive, 1.0 / np.where(alive, norms, 1.0), 0.0)
        unit_gram = g * np.outer(inverse, inverse)
        if not alive.any():
            return to_weights(np.zeros(m), gram)
        q = np.linalg.pinv(unit_gram, rcond=self.rcond, hermitian=True) @ p
        # ‖b‖² = pᵀĜ⁺p: next to nothing when p is (up to rounding) outside Ĝ's range, e.g. for
        # two opposed gradients, where b = 0 exactly and so is d.
        if not float(q @ unit_gram @ q) > 1e-12 * float(p @ p) / float(np.trace(unit_gram)):
            return to_weights(np.zeros(m), gram)
        c = inverse * q
        gc = g @ c
        squared = float(c @ gc)
        return to_weights(c * (gc.sum() / squared), gram)
