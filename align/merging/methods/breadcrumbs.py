"""Model breadcrumbs (Davari & Belilovsky, ECCV 2024): drop each task vector's largest and
smallest entries by magnitude, keep the middle.

Per tensor, of the n entries of τ_k = θ_k − θ_base sorted by magnitude, the top
⌊γ n⌋ (``gamma``: outliers, which the paper finds harmful to merge) and the bottom
n − ⌊d n⌋ − ⌊γ n⌋ (small, mostly noise) are set to 0, so exactly ⌊d n⌋ (``density``) remain.
Then

``breadcrumbs``:       θ(α) = θ_base + λ Σ_k α_k τ̂_k
``breadcrumbs_ties``:  θ(α) = θ_base + λ · TIES sign consensus of the τ̂_k (see ``ties.py``)

``breadcrumbs_ties`` leaves ``normalize`` off by default, as mergekit does (``della`` and
``ties`` turn it on). Entries with equal magnitudes are ordered by position (a stable sort), so the counts are exact.
The mask does not depend on α: it is computed once per tensor in a sweep.
"""

from __future__ import annotations

import torch
from torch import Tensor

from align.merging.base import (
    check_bool,
    check_fraction,
    check_number,
    sign_consensus,
    task_vectors,
    weighted_sum,
)
from align.merging.engine import MergeMethod
from align.merging.registry import register_merge_method


def breadcrumbs_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(top, bottom): how many of n entries the largest and the smallest masks remove."""
    keep = int(density * n)
    top = min(int(gamma * n), n - keep)
    return top, n - keep - top


def breadcrumbs_(tau: Tensor, density: float, gamma: float) -> Tensor:
    """In place: zero the ⌊γ n⌋ largest and the n − ⌊d n⌋ − ⌊γ n⌋ smallest magnitudes."""
    n = tau.numel()
    top, bottom = breadcrumbs_counts(n, density, gamma)
    if top == 0 and bottom == 0:
        return tau
    order = tau.abs().reshape(-1).argsort(stable=True)  # ascending magnitude
    drop = torch.cat([order[:bottom], order[n - top :]])
    tau.view(-1)[drop] = 0
    return tau


class _Breadcrumbs(MergeMethod):
    def check_options(self) -> None:
        density = check_fraction(self.params["density"], "density")
        gamma = check_fraction(self.params["gamma"], "gamma", allow_zero=True)
        if density + gamma > 1:
            raise ValueError(
                f"density + gamma must be <= 1 (kept + largest removed), got {density} + {gamma}"
            )
        self.params["density"], self.params["gamma"] = density, gamma
        self.params["lambda"] = check_number(self.params["lambda"], "lambda")
        if "normalize" in self.params:
            check_bool(self.params["normalize"], "normalize")

    def prepare(self, name: str, tensors: Tensor, base: Tensor | None):
        tau = task_vectors(tensors, base)
        for row in tau:
            breadcrumbs_(row, self.params["density"], self.params["gamma"])
        return base, tau


@register_merge_method("breadcrumbs")
class Breadcrumbs(_Breadcrumbs):
    """Drop the largest (γ) and smallest magnitudes, keep density d, then θ_base + λ Σ α_k τ̂_k."""

    options = {"density": 0.9, "gamma": 0.01, "lambda": 1.0}

    def apply(self, prepared, weights: Tensor) -> Tensor:
        base, tau = prepared
        return base + self.params["lambda"] * weighted_sum(weights, tau)


@register_merge_method("breadcrumbs_ties")
class BreadcrumbsTies(_Breadcrumbs):
    """Breadcrumbs masks (largest γ and smallest removed), then TIES sign consensus."""

    options = {"density": 0.9, "gamma": 0.01, "lambda": 1.0, "normalize": False}

    def apply(self, prepared, weights: Tensor) -> Tensor:
        base, tau = prepared
        merged = sign_consensus(weights, tau, normalize=self.params["normalize"])
        return base + self.params["lambda"] * merged
