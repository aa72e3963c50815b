"""DELLA: drop task-vector entries with magnitude-ranked probabilities, rescale, merge
(Deep et al., 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling").

MagPrune, per row of each task vector τ_k = θ_k − θ_base (the whole tensor if it is 1-D): rank
the n entries by magnitude, r = 0 (smallest) … n − 1 (largest), and keep entry i with probability

    p_i = (d − ε) + 2ε · r_i / (n − 1)          d = ``density``, ε = ``epsilon``

— from d − ε for the smallest to d + ε for the largest, mean d — then divide each kept entry by
its own p_i, so E[τ̃_k] = τ_k entry by entry (DARE is the case ε = 0). Then

``della``:         θ(α) = θ_base + λ · TIES sign consensus of the τ̃_k (see ``ties.py``)
``della_linear``:  θ(α) = θ_base + λ Σ_k α_k τ̃_k

Masks are seeded per (``seed``, tensor name, model index), as for DARE, so a sweep uses one mask
per model for every α. The keep probabilities are mergekit's (0.1.5: ranks within each row,
d ± ε); the draws cannot match (another generator), and the rescale differs by design: mergekit
scales the masked tensor by one factor restoring its L1 norm, align divides each survivor by its
own p_i, as the paper does, which keeps every entry's expectation. ``della`` normalises the sign
consensus by the agreeing models' weight by default and ``della_linear`` does not, as in
mergekit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from align.merging.base import (
    check_drop_options,
    check_fraction,
    check_number,
    sign_consensus,
    task_vectors,
    tensor_seed,
    weighted_sum,
)
from align.merging.engine import MergeMethod
from align.merging.registry import register_merge_method


def magnitude_keep_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """p_i = (d − ε) + 2ε · rank_i / (n − 1), ranks by magnitude within each row."""
    rows = tau.reshape(-1, tau.shape[-1]) if tau.ndim >= 2 else tau.reshape(1, -1)
    n = rows.shape[-1]
    if n == 1 or epsilon == 0:
        return torch.full_like(tau, density)
    ranks = rows.abs().argsort(dim=-1, stable=True).argsort(dim=-1).to(tau.dtype)
    return ((density - epsilon) + (2 * epsilon / (n - 1)) * ranks).reshape(tau.shape)


def magprune_(tau: Tensor, density: float, epsilon: float, seed: int, rescale: bool = True):
    """DELLA's MagPrune, in place: keep entry i with probability p_i, divide survivors by p_i."""
    if density >= 1 and epsilon == 0:
        return tau
    keep = magnitude_keep_probabilities(tau, density, epsilon)
    generator = torch.Generator().manual_seed(seed)
    draw = torch.rand(tau.shape, generator=generator, dtype=torch.float64).to(tau.dtype)
    tau.masked_fill_(draw >= keep, 0)
    return tau.div_(keep) if rescale else tau


class _Della(MergeMethod):
    def check_options(self) -> None:
        density = check_fraction(self.params["density"], "density")
        epsilon = check_number(self.params["epsilon"], "epsilon")
        if epsilon < 0 or density - epsilon <= 0 or density + epsilon > 1:
            raise ValueError(
                f"epsilon must keep every probability in (0, 1]: need 0 <= epsilon, "
                f"density - epsilon > 0 and density + epsilon <= 1, got density {density}, "
                f"epsilon {epsilon}"
            )
        self.params["density"], self.params["epsilon"] = density, epsilon
        check_drop_options(self.params)

    def prepare(self, name: str, tensors: Tensor, base: Tensor | None):
        tau = task_vectors(tensors, base)
        for k, row in enumerate(tau):
            magprune_(
                row,
                self.params["density"],
                self.params["epsilon"],
                tensor_seed(self.params["seed"], name, k),
                self.params["rescale"],
            )
        return base, tau


@register_merge_method("della")
class Della(_Della):
    """DELLA: magnitude-ranked drop probabilities (d ± ε), rescale, TIES sign consensus."""

    options = {
        "density": 0.5,
        "epsilon": 0.1,
        "lambda": 1.0,
        "seed": 0,
        "rescale": True,
        "normalize": True,
    }

    def apply(self, prepared, weights: Tensor) -> Tensor:
        base, tau = prepared
        merged = sign_consensus(weights, tau, normalize=self.params["normalize"])
        return base + self.params["lambda"] * merged


@register_merge_method("della_linear")
class DellaLinear(_Della):
    """DELLA's magnitude-ranked drop and rescale, then θ_base + λ Σ_k α_k τ̃_k."""

    options = {"density": 0.5, "epsilon": 0.1, "lambda": 1.0, "seed": 0, "rescale": True}

    def apply(self, prepared, weights: Tensor) -> Tensor:
        base, tau = prepared
        return base + self.params["lambda"] * weighted_sum(weights, tau)
