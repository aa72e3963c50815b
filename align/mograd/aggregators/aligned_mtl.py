"""Aligned-MTL: align the principal components of the gradients before combining them.

Senushkin, Patakin, Kuznetsov & Konushin (CVPR 2023), "Independent component alignment for
multi-task learning", Algorithm 1; torchjd's ``AlignedMTL`` (the same semantics and defaults).
"""

from __future__ import annotations

import torch
from torch import Tensor

from align.mograd.base import GradientAggregator
from align.mograd.registry import register_aggregator

_SCALE_MODES = ("min", "median", "rmse")


@register_aggregator("aligned_mtl", "alignedmtl")
class AlignedMTL(GradientAggregator):
    """``w = B p`` with ``G = V Λ Vᵀ`` (rank r: eigenvalues above ``λ_max · m · eps``) and

        ``B = √σ · V_r Λ_r^{-1/2} V_rᵀ``,   σ = λ_min (``"min"``), median or mean of ``Λ_r``.

    ``Jᵀ B`` has orthogonal rows of equal norm ``√σ`` on the span of the gradients (the
    "aligned" Jacobian, condition number 1); ``d = wᵀJ`` is its p-weighted sum. ``p`` is the
    preference vector (default ``1/m``); ``preference=α`` is used as ``p`` when given.

    Args:
        scale_mode: σ — ``"min"`` (default, the paper's and torchjd's), ``"median"`` or
            ``"rmse"`` (the mean eigenvalue, as in the authors' code).

    The weights are invariant to scaling J (d scales linearly) and follow permutations of the
    objectives; with all gradients zero, ``w = p``.
    """

    preference_aware = True

    def __init__(self, scale_mode: str = "min") -> None:
        super().__init__()
        if scale_mode not in _SCALE_MODES:
            raise ValueError(f"AlignedMTL: scale_mode must be one of {_SCALE_MODES}")
        self.scale_mode = scale_mode

    def compute_weights(
        self, gram: Tensor, losses: Tensor | None, preference: Tensor | None
    ) -> Tensor:
        m = gram.shape[0]
        g = gram.detach().to(device="cpu", dtype=torch.float64)
        g = 0.5 * (g + g.T)
        if preference is None:
            p = torch.full((m,), 1.0 / m, dtype=torch.float64)
        else:
            p = preference.detach().to(device="cpu", dtype=torch.float64)
        eigenvalues, eigenvectors = torch.linalg.eigh(g)
        # torchjd's rank cut-off, with the machine epsilon of the Gram's own dtype.
        eps = max(torch.finfo(gram.dtype).eps, torch.finfo(torch.float64).eps)
        tol = eigenvalues.max() * m * eps
        keep = eigenvalues > tol
        if not bool(keep.any()) or not bool(torch.isfinite(eigenvalues).all()):
            weights = p
        else:
            values, vectors = eigenvalues[keep], eigenvectors[:, keep]
            if self.scale_mode == "min":
                scale = values.min()
            elif self.scale_mode == "median":
                scale = values.median()  # the lower median for an even count, as torch's
            else:
                scale = values.mean()
            balance = scale.sqrt() * (vectors / values.sqrt()) @ vectors.T
            weights = balance @ p
        return weights.to(device=gram.device, dtype=gram.dtype)
