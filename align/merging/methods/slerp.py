"""Spherical linear interpolation (SLERP) of two models, and its multi-model form.

``slerp`` (two models, no base): with t = α_2 (the weight of the second model) and, per tensor,
Ω the angle between the flattened θ_1 and θ_2,

    θ(α) = sin((1 − t) Ω) / sin Ω · θ_1 + sin(t Ω) / sin Ω · θ_2

so t = 0 gives θ_1, t = 1 gives θ_2, and for unit vectors the path stays on the unit sphere.
Where the two are (anti-)parallel to within ``dot_threshold`` (|cos Ω| > threshold), sin Ω is too
small to divide by and the linear interpolation (1 − t) θ_1 + t θ_2 is used — for parallel
vectors it is the same path. This is mergekit's ``slerp`` with its ``t`` the second model's α.

``multislerp`` (K ≥ 2 models, optionally on task vectors τ_k = θ_k − θ_base with a base): the
α-weighted mean on the unit sphere, taken in the tangent space at the normalised linear mean m,

    u_k = x_k / ‖x_k‖,   m = Σ α_k u_k / ‖Σ α_k u_k‖,
    v   = Σ_k α_k · θ_k / sin θ_k · (u_k − cos θ_k · m),   cos θ_k = ⟨u_k, m⟩   (log maps)
    x(α) = (cos ‖v‖ · m + sin ‖v‖ · v / ‖v‖) · Σ_k α_k ‖x_k‖                    (exp map, norm)

For two models this lies on the same great circle and equals ``slerp``'s direction (with the
α-weighted mean norm); at a vertex of the simplex it returns that model.

mergekit's ``multislerp`` (0.1.5) takes the tangent vectors u_k − cos θ_k · m without the log
map's factor θ_k / sin θ_k; their α-weighted sum is then always 0, so its result is the
normalised weighted mean m scaled to the mean norm — a point that moves along the sphere
non-uniformly in α (for two models it is not SLERP). The two agree wherever the models sit
symmetrically about m (e.g. two models at α = (½, ½), checked against mergekit in the tests)
and at the vertices; elsewhere this one is the geodesic (Karcher-type) mean to first order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from align.merging.base import check_fraction, weighted_sum
from align.merging.engine import MergeMethod
from align.merging.registry import register_merge_method

_EPS = 1e-8


def slerp(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995) -> Tensor:
    """SLERP between two tensors of one shape (angle of the flattened tensors)."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if float(norm_a) < _EPS or float(norm_b) < _EPS:
        return (1 - t) * v0 + t * v1
    cos = float(torch.dot(a / norm_a, b / norm_b).clamp(-1, 1))
    if abs(cos) > dot_threshold:
        return (1 - t) * v0 + t * v1
    omega = math.acos(cos)
    sin_omega = math.sin(omega)
    return (math.sin((1 - t) * omega) / sin_omega) * v0 + (math.sin(t * omega) / sin_omega) * v1


@register_merge_method("slerp")
class Slerp(MergeMethod):
    """Spherical interpolation of two models, t = α_2 (no base model)."""

    needs_base = False
    options = {"dot_threshold": 0.9995}

    def check_options(self) -> None:
        self.params["dot_threshold"] = check_fraction(self.params["dot_threshold"], "dot_threshold")

    def prepare(self, name: str, tensors: Tensor, base: Tensor | None) -> Tensor:
        if tensors.shape[0] != 2:
            raise ValueError(
                f"slerp interpolates exactly two models, got {tensors.shape[0]}; "
                f"use multislerp for more"
            )
        return tensors

    def apply(self, prepared: Tensor, weights: Tensor) -> Tensor:
        t = float(weights[1])
        return slerp(t, prepared[0], prepared[1], self.params["dot_threshold"])


def multislerp(weights: Tensor, stacked: Tensor) -> Tensor:
    """The α-weighted spherical mean of ``stacked`` (``(K, *shape)``), scaled to the α-weighted
    mean norm (see the module notes)."""
    k = stacked.shape[0]
    flat = stacked.reshape(k, -1)
    weights = weights.to(flat.dtype)
    norms = torch.linalg.vector_norm(flat, dim=1)
    if bool((norms < _EPS).any()):
        return weighted_sum(weights, stacked)  # a zero vector has no direction
    units = flat / norms[:, None]
    mean = weights @ units
    mean_norm = torch.linalg.vector_norm(mean)
    if float(mean_norm) < _EPS:
        return weighted_sum(weights, stacked)  # opposite directions cancel: no spherical mean
    mean = mean / mean_norm
    cos = (units @ mean).clamp(-1, 1)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    # θ / sin θ → 1 as θ → 0 (a model along the mean contributes no tangent).
    factor = torch.where(sin > _EPS, theta / sin.clamp_min(_EPS), torch.ones_like(theta))
    tangent = (weights * factor) @ (units - cos[:, None] * mean)
    length = torch.linalg.vector_norm(tangent)
    direction = (
        mean
        if float(length) < _EPS
        else torch.cos(length) * mean + torch.sin(length) * tangent / length
    )
    return (direction * (weights @ norms)).reshape(stacked.shape[1:])


class _MultiSlerp(MergeMethod):
    options = {}

    def prepare(self, name: str, tensors: Tensor, base: Tensor | None):
        return base, tensors if base is None else tensors - base

    def apply(self, prepared, weights: Tensor) -> Tensor:
        base, vectors = prepared
        merged = multislerp(weights, vectors)
        return merged if base is None else base + merged


@register_merge_method("multislerp")
class MultiSlerp(_MultiSlerp):
    """Spherical α-weighted mean of K models (tangent space at the normalised mean)."""

    needs_base = False


@register_merge_method("multislerp_task")
class MultiSlerpTask(_MultiSlerp):
    """Spherical α-weighted mean of the task vectors θ_k − θ_base, added to the base."""
