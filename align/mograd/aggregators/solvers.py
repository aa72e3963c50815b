"""Small dense solvers shared by the Gram-based aggregators (nothing is registered here).

Everything works on the m×m Gram matrix ``G = J Jᵀ`` in float64 NumPy: m is the number of
objectives (a handful), so an exact active-set method costs microseconds and is far more
predictable than an iterative one with a tolerance.

* :func:`nonneg_qp` — ``min ½ xᵀQx + pᵀx`` s.t. ``x ≥ 0`` (Lawson-Hanson active set, written on
  ``Q`` and ``p`` so that it never needs the gradients). We keep our own rather than
  ``scipy.optimize.nnls``: SciPy's NNLS was rewritten in 1.12 and several releases since return
  wrong answers on small rank-deficient problems, which are exactly the degenerate Grams we must
  handle.
* :func:`min_norm_weights` — the min-norm point of the convex hull of the gradients (MGDA),
  reduced exactly to :func:`nonneg_qp`.
* :func:`frank_wolfe_min_norm` — the Frank-Wolfe alternative (Sener & Koltun 2018, Alg. 2).
* :func:`dual_cone_weights` — projection onto the dual cone of the gradients (UPGrad).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

#: Relative tolerance of the active-set method (on a Gram normalised to unit trace).
QP_TOL = 1e-12


def as_float64(gram: Tensor) -> np.ndarray:
    """The Gram as a symmetric float64 array (solvers assume exact symmetry)."""
    g = gram.detach().to(device="cpu", dtype=torch.float64).numpy()
    return 0.5 * (g + g.T)


def to_weights(weights: np.ndarray, like: Tensor) -> Tensor:
    """Weights back in the Gram's dtype and device."""
    return torch.as_tensor(np.asarray(weights, dtype=np.float64)).to(
        device=like.device, dtype=like.dtype
    )


def normalised(gram: np.ndarray) -> tuple[np.ndarray, float]:
    """``G / tr(G)`` and ``tr(G)`` (0 when every gradient is zero, G then returned as is).

    The trace is ``‖J‖_F²``; dividing by it puts every solver on the same scale, so the
    tolerances below are relative. All methods here have weights invariant to ``G → c G``.
    """
    trace = float(np.trace(gram))
    if not np.isfinite(trace) or trace <= np.finfo(np.float64).tiny:
        return gram, 0.0
    return gram / trace, trace


def definite_part(g: np.ndarray, reg_eps: float) -> tuple[np.ndarray, np.ndarray, float] | None:
    """``(alive, H, ‖G‖_F)`` with H the Gram of the non-zero gradients (``alive``), divided by
    its Frobenius norm, reduced to its PSD part plus ``reg_eps·I``: positive definite, so the
    convex programs of Nash-MTL and FairGrad on it have one solution. A zero gradient decouples
    (its row and column of G are zero) and is left out; rounding (a float32 Gram) can leave G
    slightly indefinite. None when every gradient is zero."""
    alive = np.diag(g) > 0
    frobenius = float(np.linalg.norm(g))
    if not alive.any() or frobenius == 0:
        return None
    eigenvalues, eigenvectors = np.linalg.eigh(g[np.ix_(alive, alive)] / frobenius)
    h = (eigenvectors * np.clip(eigenvalues, 0.0, None)) @ eigenvectors.T
    h = 0.5 * (h + h.T) + reg_eps * np.eye(int(alive.sum()))
    return alive, h, frobenius


def nonneg_qp(
    q: np.ndarray, p: np.ndarray, *, tol: float = QP_TOL, max_iters: int | None = None
) -> np.ndarray:
    """``argmin_{x ≥ 0} ½ xᵀQx + pᵀx`` for a PSD ``Q`` (Lawson & Hanson 1974, NNLS, ch. 23).

    Active-set method in normal-equation form: grow the free set by the coordinate with the most
    negative gradient, solve the unconstrained problem on the free set, and step back to the
    feasible boundary when that solution leaves the orthant. It is finite in exact arithmetic;
    ``max_iters`` (default ``10 m + 10``) guards against cycling from rounding, returning the last
    feasible point. Free-set systems are solved by least squares, so a singular ``Q`` (dependent
    gradients) is fine: any minimiser is returned.
    """
    m = p.shape[0]
    max_iters = 10 * m + 10 if max_iters is None else max_iters
    scale = max(float(np.abs(q).max(initial=0.0)), float(np.abs(p).max(initial=0.0)), 1.0)
    tol = tol * scale
    x = np.zeros(m)
    free = np.zeros(m, dtype=bool)
    # Coordinates whose entry failed (rounding made their free-set solution nonpositive); they
    # stay out until x changes, which is Lawson-Hanson's guard against cycling.
    blocked = np.zeros(m, dtype=bool)
    iters = 0
    while iters < max_iters:
        neg_grad = -(q @ x + p)
        candidates = np.where(~free & ~blocked & (neg_grad > tol))[0]
        if candidates.size == 0:
            break
        entering = candidates[np.argmax(neg_grad[candidates])]
        free[entering] = True
        first = True
        while iters < max_iters:
            iters += 1
            idx = np.where(free)[0]
            z = np.zeros(m)
            z[idx] = np.linalg.lstsq(q[np.ix_(idx, idx)], -p[idx], rcond=None)[0]
            if (z[idx] > 0).all():
                x = z
                blocked[:] = False
                break
            if first and z[entering] <= 0:
                free[entering] = False
                blocked[entering] = True
                break
            first = False
            # Step from x towards z until the first free coordinate reaches zero; drop it.
            out = idx[z[idx] <= 0]
            ratios = x[out] / np.maximum(x[out] - z[out], np.finfo(np.float64).tiny)
            k = int(np.argmin(ratios))
            x = x + ratios[k] * (z - x)
            x[out[k]] = 0.0
            free &= x > 0
            x[~free] = 0.0
            if not free.any():
                break
    return np.maximum(x, 0.0)


def min_norm_weights(gram: np.ndarray) -> np.ndarray:
    """Weights of the min-norm point of ``conv{g_1..g_m}``: ``argmin_{w ∈ Δ} wᵀGw``.

    Exact reduction to a nonnegative QP: minimise ``‖Σ u_i g_i‖² + (1 − Σ u_i)²`` over ``u ≥ 0``.
    Writing ``u = s w`` with ``w ∈ Δ`` gives ``s² wᵀGw + (1 − s)²``, whose minimiser in ``w`` does
    not depend on ``s > 0``; so ``w* = u* / Σ u*`` (and ``Σ u* = 1 / (1 + ‖d*‖²) > 0``).
    """
    m = gram.shape[0]
    if m == 1:
        return np.ones(1)
    g, trace = normalised(gram)
    if trace == 0.0:
        return np.full(m, 1.0 / m)
    if m == 2:
        return _min_norm_pair(g[0, 0], g[0, 1], g[1, 1])
    u = nonneg_qp(g + 1.0, -np.ones(m))
    total = u.sum()
    if not np.isfinite(total) or total <= 0:  # unreachable in exact arithmetic
        return np.full(m, 1.0 / m)
    return u / total


def _min_norm_pair(g11: float, g12: float, g22: float) -> np.ndarray:
    """Closed form for two gradients: the point of the segment [g_1, g_2] closest to 0,
    ``γ = clip((g22 − g12) / (g11 + g22 − 2 g12), 0, 1)`` on g_1 (Sener & Koltun 2018, Alg. 1)."""
    denominator = g11 + g22 - 2.0 * g12  # = ‖g_1 − g_2‖² ≥ 0
    if denominator <= 1e-15 * max(g11 + g22, 1e-300):
        return np.array([0.5, 0.5])  # g_1 = g_2: every point of the "segment" is the same
    gamma = float(np.clip((g22 - g12) / denominator, 0.0, 1.0))
    return np.array([gamma, 1.0 - gamma])


def frank_wolfe_min_norm(gram: np.ndarray, *, tol: float, max_iters: int) -> np.ndarray:
    """Frank-Wolfe for ``argmin_{w ∈ Δ} wᵀGw`` (Sener & Koltun 2018, Alg. 2), started from the
    best vertex or edge (closed forms) rather than the barycentre.

    With an exact line search each step lowers ``wᵀGw``, and at the optimum the step length is
    0, so whenever the solution lies on a vertex or an edge the start is already optimal and
    returned unchanged: exact there. Elsewhere the error after k steps is O(1/k); it stops when
    the step length falls below ``tol`` or after ``max_iters`` steps.
    """
    m = gram.shape[0]
    if m <= 2:
        return min_norm_weights(gram)
    g, trace = normalised(gram)
    if trace == 0.0:
        return np.full(m, 1.0 / m)
    best, best_value = None, np.inf
    for i in range(m):
        for j in range(i + 1, m):
            pair = _min_norm_pair(g[i, i], g[i, j], g[j, j])
            value = pair @ g[np.ix_([i, j], [i, j])] @ pair
            if value < best_value:
                best_value = value
                best = np.zeros(m)
                best[[i, j]] = pair
    w = best
    for _ in range(max_iters):
        gw = g @ w
        t = int(np.argmin(gw))
        # Exact line search on the segment [w, e_t]: the pair closed form on (wᵀGw, wᵀGe_t, G_tt).
        gamma = _min_norm_pair(w @ gw, gw[t], g[t, t])[1]
        if gamma < tol:
            break
        w = (1.0 - gamma) * w
        w[t] += gamma
    return w


def dual_cone_weights(gram: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Weights ``v`` of the projection of ``Jᵀu`` onto the dual cone ``{d : J d ≥ 0}``.

    By Proposition 1 of Quinton & Rey (2024, "Jacobian descent for multi-objective
    optimization"), the projection is ``Jᵀv`` with ``v = argmin_{v ≥ u} vᵀGv``; with ``v = u + x``
    this is the nonnegative QP ``min ½ xᵀGx + (Gu)ᵀx``, ``x ≥ 0``.
    """
    g, trace = normalised(gram)
    if trace == 0.0:
        return u.copy()
    return u + nonneg_qp(g, g @ u)
