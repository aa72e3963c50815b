"""Pareto metrics: non-dominated filtering, hypervolume, MIP, spacing, and front plots.

Conventions: ``points`` is an ``(n, m)`` array of objective values. ``maximize`` is a bool or
one bool per objective; scores (rewards) are maximised by default. Hypervolume comes from
moocore, a maintained C library; the reference point is always explicit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import moocore
import numpy as np

from align.io import atomic_file

Maximize = bool | Sequence[bool]


def _as_points(points: Any, name: str = "points") -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] < 1:
        raise ValueError(
            f"{name} must be an (n, m) array of objective values, got shape {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(
            f"{name} contains non-finite values: {array[~np.isfinite(array).all(1)].tolist()}"
        )
    return array


def _maximize_vector(maximize: Maximize, m: int) -> np.ndarray:
    flags = np.asarray(maximize, dtype=bool)
    if flags.ndim == 0:
        flags = np.full(m, bool(flags))
    if flags.shape != (m,):
        raise ValueError(f"maximize must be a bool or {m} bools, got {maximize!r}")
    return flags


def pareto_mask(points: Any, maximize: Maximize = True) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``points`` (duplicates of a front point kept)."""
    array = _as_points(points)
    if array.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    flags = _maximize_vector(maximize, array.shape[1])
    return np.asarray(moocore.is_nondominated(array, maximise=flags.tolist(), keep_weakly=True))


def pareto_front(points: Any, maximize: Maximize = True) -> np.ndarray:
    """The non-dominated rows of ``points``, unique and sorted by the first objective."""
    array = _as_points(points)
    front = np.unique(array[pareto_mask(array, maximize)], axis=0)
    return front[np.argsort(front[:, 0], kind="stable")]


def dominates(points: Any, point: Any, maximize: Maximize = True) -> bool:
    """Whether some row of ``points`` is at least as good as ``point`` on every objective and
    strictly better on one (Pareto dominance of a set over a point): ``point`` is then off the
    front of the two together."""
    array = _as_points(points)
    target = _as_points(np.asarray(point, dtype=np.float64).reshape(1, -1), "point")
    if target.shape[1] != array.shape[1]:
        raise ValueError(f"point has {target.shape[1]} objectives, points have {array.shape[1]}")
    return not bool(pareto_mask(np.vstack([array, target]), maximize)[-1])


def hypervolume(points: Any, reference: Any, maximize: Maximize = True) -> float:
    """Volume of objective space dominated by ``points`` and bounded by ``reference``.

    For maximised objectives the reference point must lie below the points worth counting (a
    worst-case value per objective); points that do not strictly improve on it in every
    objective add nothing.
    """
    array = _as_points(points)
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    if ref.shape != (array.shape[1],) or not np.all(np.isfinite(ref)):
        raise ValueError(
            f"reference point must be {array.shape[1]} finite values, got {np.asarray(reference).tolist()}"
        )
    if array.shape[0] == 0:
        return 0.0
    flags = _maximize_vector(maximize, array.shape[1])
    return float(moocore.hypervolume(array, ref=ref, maximise=flags.tolist()))


def normalize_scores(scores: Any, lower: Any | None = None, upper: Any | None = None) -> np.ndarray:
    """Min-max normalise each objective to [0, 1] (over the rows, unless bounds are given).

    An objective whose values are all equal maps to 0.5, not to a division by zero.
    """
    array = _as_points(scores, "scores")
    lo = array.min(axis=0) if lower is None else np.asarray(lower, dtype=np.float64)
    hi = array.max(axis=0) if upper is None else np.asarray(upper, dtype=np.float64)
    span = hi - lo
    if np.any(span < 0):
        raise ValueError(f"upper bounds {hi.tolist()} must not be below lower bounds {lo.tolist()}")
    safe = np.where(span > 0, span, 1.0)
    return np.where(span > 0, (array - lo) / safe, 0.5)


def mip(preferences: Any, scores: Any, lower: Any | None = None, upper: Any | None = None) -> float:
    """Mean inner product of each α with its min-max normalised score vector (PARM's MIP).

    ``preferences`` and ``scores`` are ``(K, m)``: row k is the α used and the scores obtained.
    Higher is better: the outputs move in the direction each α asks for.
    """
    alphas = _as_points(getattr(preferences, "weights", preferences), "preferences")
    values = _as_points(scores, "scores")
    if alphas.shape != values.shape:
        raise ValueError(
            f"preferences and scores must have the same (K, m) shape, got {alphas.shape} and {values.shape}"
        )
    normalized = normalize_scores(values, lower, upper)
    return float(np.mean(np.sum(alphas * normalized, axis=1)))


def spacing(points: Any) -> float:
    """Schott's spacing: the spread of nearest-neighbour (L1) distances; 0 is perfectly even.

    Undefined (NaN) for fewer than two points.
    """
    array = _as_points(points)
    n = array.shape[0]
    if n < 2:
        return float("nan")
    distances = np.abs(array[:, None, :] - array[None, :, :]).sum(axis=-1)
    np.fill_diagonal(distances, np.inf)
    nearest = distances.min(axis=1)
    return float(np.sqrt(np.sum((nearest.mean() - nearest) ** 2) / (n - 1)))


def plot_fronts(
    fronts: Mapping[str, Any],
    path: str | os.PathLike,
    objectives: Sequence[str] = ("objective 1", "objective 2"),
    *,
    labels: Mapping[str, Sequence[str]] | None = None,
    maximize: Maximize = True,
    title: str | None = None,
) -> Path:
    """Write a PNG with one scatter per named set of points, its Pareto front joined by a line.

    ``labels`` optionally annotates each point (for example with its α). Two objectives give one
    panel; more give one panel per pair of objectives.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    if not fronts:
        raise ValueError("plot_fronts needs at least one named set of points")
    arrays = {name: _as_points(points, f"points of {name!r}") for name, points in fronts.items()}
    m = len(objectives)
    for name, array in arrays.items():
        if array.shape[1] != m:
            raise ValueError(
                f"{name!r} has {array.shape[1]} objectives, expected {m} ({tuple(objectives)})"
            )
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)] or [(0, 0)]
    fig = Figure(figsize=(6 * len(pairs), 5), dpi=120)
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    for ax, (i, j) in zip(axes, pairs):
        for name, array in arrays.items():
            (handle,) = ax.plot(array[:, i], array[:, j], "o", alpha=0.5, label=name)
            front = pareto_front(array[:, [i, j]], _maximize_vector(maximize, m)[[i, j]])
            ax.plot(front[:, 0], front[:, 1], "-", color=handle.get_color(), linewidth=1.5)
            for text, (x, y) in zip((labels or {}).get(name, ()), array[:, [i, j]]):
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(objectives[i])
        ax.set_ylabel(objectives[j])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
