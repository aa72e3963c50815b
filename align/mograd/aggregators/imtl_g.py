"""IMTL-G: the update with equal projections on every unit gradient.

Liu et al. (ICLR 2021), "Towards impartial multi-task learning"; Gram form and the
pseudo-inverse generalisation to dependent gradients from Quinton & Rey (2024), "Jacobian
descent for multi-objective optimization".
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from align.mograd.aggregators.solvers import as_float64, normalised, to_weights
from align.mograd.base import GradientAggregator
from align.mograd.registry import register_aggregator


@register_aggregator("imtl_g", "imtlg")
class IMTLG(GradientAggregator):
    """``w = G⁺ s / (1ᵀ G⁺ s)`` with ``s_i = ‖g_i‖``, ``d = Σ w_i g_i``.

    Impartiality asks ``u_i · d`` to be the same for every unit gradient ``u_i = g_i / ‖g_i‖``,
    i.e. ``G w = k s``, and the weights to sum to 1; for independent gradients that is the
    formula above (the paper's closed form, written on the Gram). For dependent gradients the
    pseudo-inverse gives the least-squares answer (torchjd's generalisation). When
    ``1ᵀ G⁺ s`` vanishes no such normalised weights exist and the weights are all zero (no
    update), as in torchjd. Weights are invariant to scaling J and follow permutations of the
    objectives; ``d`` need not be a descent direction for every objective.

    Eigenvalues below ``rcond · λ_max`` are treated as zero; the default scales with the Gram's
    dtype (``1e3 · m · ε``, at most 1e-3) because a float32 Gram of dependent gradients has "zero"
    eigenvalues of order ``ε · λ_max``, and inverting those would amplify rounding noise.
    """

    def __init__(self, rcond: float | None = None) -> None:
        super().__init__()
        if rcond is not None and not rcond >= 0:
            raise ValueError("IMTL-G: rcond must be >= 0")
        self.rcond = rcond

    def compute_weights(
        self, gram: Tensor, losses: Tensor | None, preference: Tensor | None
    ) -> Tensor:
        g, trace = normalised(as_float64(gram))
        m = g.shape[0]
        if trace == 0.0:
            return to_weights(np.zeros(m), gram)
        rcond = self.rcond
        if rcond is None:
            eps = torch.finfo(gram.dtype).eps if gram.dtype.is_floating_point else 1e-16
            # Capped: a half-precision ε would otherwise discard every eigenvalue.
            rcond = min(1e3 * m * max(eps, np.finfo(np.float64).eps), 1e-3)
        eigenvalues, eigenvectors = np.linalg.eigh(g)
        keep = eigenvalues > rcond * eigenvalues.max()
        norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
        # G⁺ s through the kept eigenpairs: V diag(1/λ) Vᵀ s.
        v = eigenvectors[:, keep] @ ((eigenvectors[:, keep].T @ norms) / eigenvalues[keep])
        total = v.sum()
        # v is O(1/√λ_min) on a unit-trace Gram; a sum that small next to it is a cancellation.
        if abs(total) <= 1e-10 * max(np.abs(v).max(), 1.0):
            return to_weights(np.zeros(m), gram)
        return to_weights(v / total, gram)
