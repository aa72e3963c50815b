"""ML2O, GML2O and Gram-L2O against MGDA, PCGrad and linear scalarization on held-out problems.

    OMP_NUM_THREADS=1 python evaluation/ml2o_heldout.py                  # 3 seeds, 100 steps
    OMP_NUM_THREADS=1 python evaluation/ml2o_heldout.py --seeds 0 --steps 50 --output r.json

The problems (:func:`lab.meta_training.problems.heldout_problems`) differ from the
meta-training distribution in size, architecture, data and number of objectives: ZDT2 (n = 20)
and DTLZ2 (m = 3), a rotated quadratic with n = 200 and m = 4, a 2-hidden-layer GELU multi-task
network with three tasks on mixture data, a rank-4 adapter on the o/up projections of a 3-layer
tiny Llama with prompt categories never used in meta-training.

Same budget for every method: per seed, the same K starting points, the same mini-batches
(where the problem has data) and ``steps`` plain steps ``x ← Π(x − η d)`` with the problem's η.
Linear scalarization uses equal weights (d = mean gradient). PCGrad's direction is the *sum* of
the projected gradients (Yu et al. 2020), about m times the length of the others' (MGDA's
weights and LS's sum to 1), which makes it diverge at the shared η; it is divided by m here, so
every method takes steps on the same scale. A run whose gradients become non-finite stops and
counts as diverged (its point is left out of the hypervolume). Reported per problem and method:

* the final objectives (full data), mean over seeds and starts;
* the hypervolume of the K final points, reference point 1.1 × the largest starting value of
  each objective (the same for every method), mean ± std over seeds; higher is better;
* for GML2O: the Pareto-stationarity measure ‖d*‖ (norm of the min-norm element of the convex
  hull of the full-data gradients; projected on box-constrained problems, see
  :func:`stationarity`) at steps 0, T/4, T/2, T, and the acceptance rate.

``--growing-batch`` makes the mini-batches of the data-driven problems (multi-task network,
tiny-LM adapter) grow geometrically to the whole data set, for every method: the growing sample
of DSSMG, without which stochastic steps of a constant size stall at a noise floor.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

# lab/ (the research code, not shipped with align) is found from the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.metrics import hypervolume
from align.mograd import get_aggregator
from lab.meta_training.meta import jacobian_at
from lab.meta_training.problems import Problem, heldout_problems

METHODS = ("ml2o", "gml2o", "gram_l2o", "mgda", "pcgrad", "linear")
#: Learned methods (rows of the "paired by seed" table).
LEARNED = ("ml2o", "gml2o", "gram_l2o")


def stationarity(problem: Problem, x: torch.Tensor) -> float:
    """The Pareto-stationarity measure with full-data gradients: ‖d*(x)‖, the norm of the
    min-norm element of the gradients' convex hull; on a box-constrained problem its projected
    form ‖(x − Π(x − η d*)) / η‖, which vanishes at the constrained Pareto-critical points (a
    corner of the box where d* points outwards); the same as ‖d*‖ in the interior."""
    xg = x.detach().clone().requires_grad_(True)
    jacobian = jacobian_at(problem.losses(xg, full=True), xg)
    direction = get_aggregator("mgda")(jacobian.double()).to(x)
    with torch.no_grad():
        moved = (x - problem.project(x - problem.lr * direction)) / problem.lr
    return float(moved.norm())


def batch_size(problem: Problem, step: int, steps: int, growing: bool) -> int | None:
    """The mini-batch of this step: the problem's own, or (``growing``, DSSMG-style) growing
    geometrically from it to the whole data set at 3/4 of the run."""
    base = getattr(problem, "batch", None)
    if base is None or not growing:
        return base
    full = problem.data_size
    ramp = max(1, (3 * steps) // 4)
    return int(min(full, round(base * (full / base) ** min(1.0, step / ramp))))


def run(
    problem: Problem, method: str, start: torch.Tensor, steps: int, seed: int, growing: bool
) -> dict:
    generator = torch.Generator().manual_seed(seed)
    base_batch = getattr(problem, "batch", None)
    aggregator = None if method == "linear" else get_aggregator(method)
    x = start.clone()
    marks = sorted({0, steps // 4, steps // 2, steps})
    measure = {}
    for step in range(steps):
        if method == "gml2o" and step in marks:
            measure[step] = stationarity(problem, x)
        if base_batch is not None:
            problem.batch = batch_size(problem, step, steps, growing)
        xg = x.clone().requires_grad_(True)
        values = problem.losses(xg, generator)
        jacobian = jacobian_at(values, xg)
        if not torch.isfinite(jacobian).all():
            return {"final": np.full(problem.num_objectives, np.nan), "diverged": True}
        if aggregator is None:
            direction = jacobian.mean(0)
        elif method == "pcgrad":  # a sum of m projected gradients: on the others' scale
            direction = aggregator(jacobian).to(x) / jacobian.shape[0]
        elif method == "gram_l2o":  # it reads the losses too (as the engine passes them)
            direction = aggregator(jacobian, losses=values.detach()).to(x)
        else:
            direction = aggregator(jacobian).to(x)
        with torch.no_grad():
            x = problem.project(x - problem.lr * direction)
    if base_batch is not None:
        problem.batch = base_batch
    if method == "gml2o":
        measure[steps] = stationarity(problem, x)
    with torch.no_grad():
        final = problem.losses(x, full=True).numpy().astype(float)
    out = {"final": final, "diverged": not np.isfinite(final).all()}
    if method == "gml2o":
        out["stationarity"] = measure
    if hasattr(aggregator, "acceptance_rate"):
        out["acceptance"] = aggregator.acceptance_rate
    return out


def evaluate(args: argparse.Namespace) -> list[dict]:
    rows = []
    for problem in heldout_problems():
        if args.problems and not any(problem.name.startswith(p) for p in args.problems):
            continue
        began = time.perf_counter()
        per_method = {
            m: {"finals": [], "hv": [], "stat": [], "acc": [], "diverged": 0} for m in args.methods
        }
        for seed in args.seeds:
            g = torch.Generator().manual_seed(1000 + seed)
            starts = [problem.initial(g) for _ in range(args.starts)]
            with torch.no_grad():
                initial = np.stack([problem.losses(s, full=True).numpy() for s in starts])
            reference = 1.1 * initial.max(0)
            for method in args.methods:
                results = [
                    run(problem, method, s, args.steps, seed * 100 + k, args.growing_batch)
                    for k, s in enumerate(starts)
                ]
                finals = np.stack([r["final"] for r in results])
                record = per_method[method]
                record["finals"].append(finals)
                record["diverged"] += sum(bool(r["diverged"]) for r in results)
                inside = finals[np.isfinite(finals).all(1) & (finals < reference).all(1)]
                record["hv"].append(
                    hypervolume(inside, reference, maximize=False) if len(inside) else 0.0
                )
                record["stat"] += [r["stationarity"] for r in results if "stationarity" in r]
                record["acc"] += [r["acceptance"] for r in results if "acceptance" in r]
        for method, record in per_method.items():
            row = {
                "problem": problem.name,
                "m": problem.num_objectives,
                "dim": problem.dim,
                "method": method,
                "final": np.nanmean(np.concatenate(record["finals"]), 0).round(4).tolist(),
                "diverged": record["diverged"],
                "runs": len(args.seeds) * args.starts,
                "hv_mean": float(np.mean(record["hv"])),
                "hv_std": float(np.std(record["hv"])),
                "hv_per_seed": [float(h) for h in record["hv"]],
            }
            if record["stat"]:
                keys = sorted(record["stat"][0])
                row["stationarity"] = {
                    int(k): float(np.mean([s[k] for s in record["stat"]])) for k in keys
                }
            if record["acc"]:
                row["acceptance_rate"] = float(np.mean(record["acc"]))
            rows.append(row)
        print(f"# {problem.name}: {time.perf_counter() - began:.1f}s", file=sys.stderr, flush=True)
    return rows


def render(rows: list[dict], args: argparse.Namespace) -> str:
    batches = "growing mini-batches" if args.growing_batch else "fixed mini-batches"
    lines = [
        f"Held-out problems, {args.steps} steps, seeds {args.seeds}, {args.starts} starts per "
        f"seed, {batches}; HV: hypervolume of the final points (higher is better), mean ± std "
        f"over seeds.",
        "",
        "| problem | method | final objectives (mean) | HV | HV / HV(MGDA) | diverged |",
        "|---|---|---|---|---|---|",
    ]
    by_problem: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_problem.setdefault(row["problem"], {})[row["method"]] = row
    for name, methods in by_problem.items():
        base = methods.get("mgda", {}).get("hv_mean")
        for method, row in methods.items():
            ratio = f"{row['hv_mean'] / base:.3f}" if base else "-"
            final = ", ".join(f"{v:.4g}" for v in row["final"])
            lines.append(
                f"| {name} | {method} | {final} | {row['hv_mean']:.4g} ± {row['hv_std']:.2g} "
                f"| {ratio} | {row['diverged']}/{row['runs']} |"
            )
    lines += ["", "GML2O: Pareto-stationarity ‖d*‖ over steps (mean over seeds and starts)", ""]
    lines += ["| problem | ‖d*‖ by step | ratio end/start | acceptance rate |", "|---|---|---|---|"]
    for name, methods in by_problem.items():
        row = methods.get("gml2o")
        if row and "stationarity" in row:
            stat = {int(k): v for k, v in row["stationarity"].items()}  # JSON keys are strings
            steps = sorted(stat)
            text = ", ".join(f"{k}: {stat[k]:.3g}" for k in steps)
            ratio = stat[steps[-1]] / stat[steps[0]] if stat[steps[0]] else float("nan")
            lines.append(f"| {name} | {text} | {ratio:.3g} | {row['acceptance_rate']:.3f} |")
    accepted = [
        (name, row["acceptance_rate"])
        for name, methods in by_problem.items()
        for method, row in methods.items()
        if method == "gram_l2o" and "acceptance_rate" in row
    ]
    if accepted:
        lines += [
            "",
            "Gram-L2O: acceptance rate of the learned weights: "
            + ", ".join(f"{name} {rate:.3f}" for name, rate in accepted),
        ]
    learned = [m for m in LEARNED if m in args.methods]
    others = [m for m in ("mgda", "pcgrad", "linear") if m in args.methods]
    if learned and others:
        lines += [
            "",
            "Seeds where the learned method's hypervolume is higher (paired, same starts)",
            "",
        ]
        lines += ["| problem | " + " | ".join(f"{a} > {b}" for a in learned for b in others) + " |"]
        lines += ["|---|" + "---|" * (len(learned) * len(others))]
        for name, methods in by_problem.items():
            cells = []
            for a in learned:
                for b in others:
                    pairs = list(zip(methods[a]["hv_per_seed"], methods[b]["hv_per_seed"]))
                    wins = sum(x > y + 1e-12 for x, y in pairs)
                    ties = sum(abs(x - y) <= 1e-12 for x, y in pairs)
                    cells.append(f"{wins}/{len(pairs)}" + (f" ({ties} tied)" if ties else ""))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    wins = {m: 0 for m in args.methods}
    for methods in by_problem.values():
        best = max(methods.values(), key=lambda r: r["hv_mean"])
        wins[best["method"]] += 1
    lines += ["", "Best hypervolume per problem: " + ", ".join(f"{m} {n}" for m, n in wins.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--starts", type=int, default=4, help="starting points per seed (K)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument(
        "--growing-batch",
        action="store_true",
        help="mini-batches grow geometrically to the full data by 3/4 of the run (DSSMG's "
        "growing sample), for every method",
    )
    parser.add_argument("--problems", nargs="+", help="only problems whose name starts so")
    parser.add_argument("--output", help="also write the rows as JSON")
    parser.add_argument("--render", help="print the tables of a saved --output JSON and exit")
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        args.methods = list(dict.fromkeys(r["method"] for r in saved))
        args.steps, args.seeds, args.starts = saved[0].get(
            "setup", [args.steps, args.seeds, args.starts]
        )
        args.growing_batch = saved[0].get("growing_batch", args.growing_batch)
        print(render(saved, args))
        return 0
    torch.set_num_threads(1)
    began = time.perf_counter()
    rows = evaluate(args)
    print(render(rows, args))
    print(f"\n({time.perf_counter() - began:.0f}s)")
    if args.output:
        for row in rows:
            row["setup"] = [args.steps, args.seeds, args.starts]
            row["growing_batch"] = args.growing_batch
        Path(args.output).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
