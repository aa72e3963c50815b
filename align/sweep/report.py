"""The numbers a sweep is judged by, and the report folder a person reads.

Per route: the mean score of every objective at each α (one point of the front per α),
hypervolume, MIP, spacing and, for routes swept over α, Spearman's ρ between α_i and the mean
score of objective i (does asking for more of objective i give more of it?).

Hypervolume and MIP are measured on a fixed scale, the scorers' natural ranges (``bounds``:
positivity [-1, 1], brevity [0, 1], ...; a reward model's range is given in its config): each
objective's mean score ``s`` becomes ``(s - low) / (high - low)`` in [0, 1], the hypervolume is the
fraction of that unit box the route's front dominates (reference point: every objective at its
worst, ``low``), and MIP is the mean over α of ``α · normalised scores``. A route's figures thus
depend on its own points only: adding or removing a route changes no other route's numbers,
and two reports with the same scorers can be compared.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from align.io import atomic_directory
from align.metrics import dominates, hypervolume, mip, pareto_mask, plot_fronts, spacing


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (NaN when either side is constant)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def route_metrics(
    routes: Mapping[str, Mapping[str, Any]],
    objectives: Sequence[str],
    bounds: Sequence[Sequence[float]],
) -> dict[str, Any]:
    """``routes[name] = {"alphas": (K, m), "means": (K, m), ...}`` → metrics per route, on the
    fixed scale ``bounds`` ((m, 2): each objective's worst and best score)."""
    bounds = np.asarray(bounds, dtype=float)
    if bounds.shape != (len(objectives), 2) or not np.all(bounds[:, 1] > bounds[:, 0]):
        raise ValueError(
            f"bounds must be one (low, high) pair per objective {list(objectives)} with "
            f"high > low, got {bounds.tolist()}"
        )
    lower, upper = bounds[:, 0], bounds[:, 1]
    metrics = {}
    for name, route in routes.items():
        alphas = np.asarray(route["alphas"], dtype=float)
        means = np.asarray(route["means"], dtype=float)
        # Clipped: a mean outside the declared range would be a scorer bug; it must not add area.
        normalised = np.clip((means - lower) / (upper - lower), 0.0, 1.0)
        entry: dict[str, Any] = {
            "points": len(means),
            "hypervolume": hypervolume(normalised, np.zeros(len(objectives))),
            "pareto_optimal_points": int(pareto_mask(means).sum()),
            "spacing": spacing(normalised),
        }
        if route.get("uses_preference", True) and len(means) > 1:
            entry["mip"] = mip(
                alphas, normalised, np.zeros(len(objectives)), np.ones(len(objectives))
            )
            entry["spearman"] = {
                objective: spearman(alphas[:, i], means[:, i])
                for i, objective in enumerate(objectives)
            }
        metrics[name] = entry
    return {
        "bounds": {o: [float(lo), float(hi)] for o, lo, hi in zip(objectives, lower, upper)},
        "reference_point": lower.tolist(),
        "routes": metrics,
        "dominates_base": base_dominance(routes),
    }


def base_dominance(routes: Mapping[str, Mapping[str, Any]]) -> dict[str, bool]:
    """Whether each route's front dominates the untuned base's point (some α at least as good
    on every objective, better on one), when the sweep has one ``base`` route; else empty.
    Kept apart from the per-route figures, which depend on their own route's points only."""
    bases = [name for name, route in routes.items() if route.get("kind") == "base"]
    if len(bases) != 1:
        return {}
    point = np.asarray(routes[bases[0]]["means"], dtype=float).mean(axis=0)
    return {
        name: dominates(route["means"], point) for name, route in routes.items() if name != bases[0]
    }


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def summary_markdown(report: Mapping[str, Any]) -> str:
    """The Markdown page of a report: the table of routes, then the front of each."""
    objectives = report["objectives"]
    metrics = report["metrics"]["routes"]
    lines = [
        f"# {report.get('title', 'α sweep')}",
        "",
        f"Base model `{report['base']}`; objectives {', '.join(f'`{o}`' for o in objectives)} "
        f"scored by {', '.join(f'`{s}`' for s in report['scorers'].values())}; "
        f"{report['num_prompts']} prompts, {report['generation'].get('max_new_tokens')} new "
        f"tokens, {'sampling' if report['generation'].get('do_sample') else 'greedy'}.",
        "",
        "| route | points | hypervolume | MIP | "
        + " | ".join(f"Spearman ρ ({o})" for o in objectives)
        + " | Pareto-optimal points | dominates the base |",
        "|---|---|---|---|" + "---|" * len(objectives) + "---|---|",
    ]
    over_base = report["metrics"].get("dominates_base", {})
    for name, entry in metrics.items():
        rho = entry.get("spearman", {})
        beats = {True: "yes", False: "no"}.get(over_base.get(name), "–")
        lines.append(
            f"| {name} | {entry['points']} | {_fmt(entry['hypervolume'])} | "
            f"{_fmt(entry.get('mip'))} | "
            + " | ".join(_fmt(rho.get(o)) for o in objectives)
            + f" | {entry['pareto_optimal_points']} | {beats} |"
        )
    bounds = report["metrics"]["bounds"]
    lines += [
        "",
        "Hypervolume and MIP on a fixed scale, each objective normalised by its scorer's range ("
        + ", ".join(f"`{o}` [{lo:g}, {hi:g}]" for o, (lo, hi) in bounds.items())
        + "): hypervolume is the fraction of that box the front dominates (reference point: "
        "every objective at its worst), so a route's figures depend on its points only and "
        "compare across reports with the same scorers. Spacing is on the same scale. A front "
        "dominates the base when one of its α is at least as good as the untuned base on every "
        "objective and better on one.",
        "",
        "![Pareto fronts](front.png)",
        "",
    ]
    for name, route in report["routes"].items():
        lines += [f"## {name}", "", "| α | " + " | ".join(objectives) + " |"]
        lines.append("|---|" + "---|" * len(objectives))
        for alpha, means in zip(route["alphas"], route["means"]):
            label = ", ".join(f"{a:.1f}" for a in alpha) if route.get("uses_preference") else "–"
            lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in means) + " |")
        lines.append("")
    if report.get("timings"):
        lines += ["## Time", ""]
        lines += [f"* {stage}: {seconds:.0f} s" for stage, seconds in report["timings"].items()]
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict[str, Any], folder: str | Path) -> Path:
    """``report.json``, ``front.png`` and ``summary.md`` in ``folder``, written atomically."""
    objectives = report["objectives"]
    fronts = {name: np.asarray(r["means"]) for name, r in report["routes"].items()}
    labels = {
        name: [f"{a[0]:.1f}" for a in r["alphas"]] if r.get("uses_preference") else ["base"]
        for name, r in report["routes"].items()
    }
    with atomic_directory(Path(folder), overwrite=True) as tmp:
        plot_fronts(
            fronts,
            tmp / "front.png",
            objectives,
            labels=labels,
            title=f"{report.get('title', 'α sweep')}\n(point labels: α_{objectives[0]})",
        )
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
        (tmp / "summary.md").write_text(summary_markdown(report))
    return Path(folder)
