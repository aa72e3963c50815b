"""Hypervolume gap of every multi-gradient method on synthetic problems with known fronts.

For each problem and method, the gap ``HV(true front) − HV(found points)`` (problem's reference
point, lower is better) of the points a solver finds:

    python evaluation/mograd_synthetic.py                      # finite set, every method
    python evaluation/mograd_synthetic.py --solver psl         # Pareto set learning
    python evaluation/mograd_synthetic.py --problems zdt2 --methods linear,tch,stch \\
        --output results.md                                    # or .json

* ``finite``: K = 11 preferences for 2 objectives (α_1 = 0, 0.1, …, 1), K = 21 for 3
  (a 5-division simplex grid), pulled 1 % towards the centre, since at an exact vertex every
  other objective has weight 0 and the solution is only weakly Pareto optimal. One solution per
  α, plain projected gradient descent (the same steps and learning rate for every method).
  Methods that ignore α (marked "K starts") still return K solutions, one from each of the same
  K random starting points the preference-based methods use.
* ``psl``: an α-conditioned network trained with Adam on α ~ Dirichlet(1), read out on 100
  (m = 2) or 1035 (m = 3) α. By default the smooth Tchebycheff paper's protocol (Lin et al.,
  ICML 2024, as its code github.com/Xi-L/STCH runs it: an MLP m → 512 → 512 → n, 2,000 Adam
  steps at lr 1e-3, 10 preferences per step; ``PSL_PROTOCOL``); the table's caption says
  whether ``--steps`` / ``--lr`` moved it off that protocol. A method that ignores α gives the
  network no reason to depend on it, so its "front" collapses to about one point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

# lab/ (the research code, not shipped with align) is found from the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.io import atomic_file
from align.metrics import hypervolume
from align.preference import simplex_grid
from lab.synthetic import (
    PROBLEMS,
    PSL_PROTOCOL,
    get_problem,
    hypervolume_gap,
    method_names,
    pareto_set_learning,
    solve_finite_set,
)

DEFAULTS = {
    # Plain projected gradient descent, as the finite-set solver is specified.
    "finite": {"steps": 300, "lr": 0.1, "optimizer": "sgd"},
    # The smooth Tchebycheff paper's Pareto set learning: Adam, its steps and learning rate
    # (its network and preferences per step are pareto_set_learning's defaults).
    "psl": {"steps": PSL_PROTOCOL["steps"], "lr": PSL_PROTOCOL["lr"], "optimizer": "adam"},
}


def finite_preferences(m: int) -> torch.Tensor:
    """The finite solver's α: a simplex grid pulled 1 % towards the centre."""
    return 0.99 * simplex_grid(m, 10 if m == 2 else 5) + 0.01 / m


def solver_options(
    solver: str, steps: int | None = None, lr: float | None = None, optimizer: str | None = None
) -> dict:
    """The keyword arguments the script gives the solver: its defaults, overridden."""
    options = dict(DEFAULTS[solver])
    for key, value in (("steps", steps), ("lr", lr), ("optimizer", optimizer)):
        if value is not None:
            options[key] = value
    # Pareto set learning always trains its network with Adam.
    if solver == "psl" and options.pop("optimizer") != "adam":
        raise ValueError("Pareto set learning trains with Adam; --optimizer is for finite")
    return options


def psl_protocol(settings: dict) -> str:
    """Which protocol a Pareto-set-learning run followed, in words, for the table's caption."""
    paper = (
        f"MLP m→{PSL_PROTOCOL['hidden']}→{PSL_PROTOCOL['hidden']}→n, Adam lr {PSL_PROTOCOL['lr']}, "
        f"{PSL_PROTOCOL['steps']} steps, {PSL_PROTOCOL['batch_size']} α ~ "
        f"Dirichlet({PSL_PROTOCOL['concentration']:g}) per step"
    )
    changed = [
        f"{key} {settings[key]} (paper {PSL_PROTOCOL[key]})"
        for key in ("steps", "lr", "hidden", "batch_size", "concentration")
        if key in settings and settings[key] != PSL_PROTOCOL[key]
    ]
    source = "the smooth Tchebycheff paper's PSL protocol (Lin et al., ICML 2024; Xi-L/STCH)"
    if not changed:
        return f"{source}: {paper}"
    return f"NOT {source} — changed: {', '.join(changed)}; the paper's: {paper}"


def run(args: argparse.Namespace) -> dict:
    options = solver_options(args.solver, args.steps, args.lr, args.optimizer)
    settings = {"optimizer": "adam", **options}
    if args.solver == "psl":
        # The network and the preferences per step: pareto_set_learning's (the paper's).
        settings.update(
            {key: PSL_PROTOCOL[key] for key in ("hidden", "batch_size", "concentration")},
            protocol=psl_protocol(settings),
        )
    problems = [get_problem(name) for name in args.problems]
    methods = method_names() if args.methods == ["all"] else args.methods
    rows = []
    for method in methods:
        for problem in problems:
            m = problem.num_objectives
            began = time.perf_counter()
            row = {"method": method, "problem": problem.name}
            try:
                if args.solver == "finite":
                    result = solve_finite_set(
                        problem, method, finite_preferences(m), seed=args.seed, **options
                    )
                else:
                    result = pareto_set_learning(problem, method, seed=args.seed, **options)
                row.update(
                    method=result.method,
                    preference_based=result.preference_based,
                    hypervolume=hypervolume(
                        result.objectives, problem.reference_point, maximize=False
                    ),
                    gap=hypervolume_gap(problem, result.objectives),
                    points=len(result.objectives),
                )
            except Exception as error:  # one failing method must not hide the others
                row["error"] = f"{type(error).__name__}: {error}"
            row["seconds"] = time.perf_counter() - began
            rows.append(row)
            print(
                f"  {row['method']:<20} {problem.name:<8} "
                + (f"gap {row['gap']:.4f}" if "gap" in row else row["error"][:80])
                + f"  ({row['seconds']:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    return {
        "solver": args.solver,
        "seed": args.seed,
        **settings,
        "problems": {
            p.name: {
                "true_hypervolume": p.true_hypervolume,
                "reference_point": list(p.reference_point),
                "num_variables": p.num_variables,
                "num_objectives": p.num_objectives,
            }
            for p in problems
        },
        "results": rows,
    }


def _table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    problems = list(report["problems"])
    header = ["method", "α", *problems, "seconds"]
    by_method: dict[str, dict] = {}
    for row in report["results"]:
        by_method.setdefault(row["method"], {})[row["problem"]] = row
    lines = []
    for method, cells in by_method.items():
        prefs = [c["preference_based"] for c in cells.values() if "preference_based" in c]
        ignored = "K starts" if report["solver"] == "finite" else "ignores α"
        label = "?" if not prefs else ("α" if prefs[0] else ignored)
        values = []
        for problem in problems:
            cell = cells.get(problem, {})
            values.append(f"{cell['gap']:.4f}" if "gap" in cell else "error")
        seconds = sum(c["seconds"] for c in cells.values())
        lines.append([method, label, *values, f"{seconds:.1f}"])
    return header, lines


def caption(report: dict) -> str:
    truth = ", ".join(f"{n} {p['true_hypervolume']:.4f}" for n, p in report["problems"].items())
    ignored = (
        "'K starts': the method ignores α; its K solutions come from K random starts."
        if report["solver"] == "finite"
        else "'ignores α': the network gets no reason to depend on α; its front collapses."
    )
    if report["solver"] == "psl":
        settings = f"{report['protocol']}; seed {report['seed']}"
    else:
        settings = (
            f"{report['steps']} steps, lr {report['lr']}, {report['optimizer']}, "
            f"seed {report['seed']}"
        )
    return (
        f"HV gap (lower is better), solver {report['solver']}: {settings}. "
        f"True HV: {truth}. {ignored}"
    )


def to_markdown(report: dict) -> str:
    header, lines = _table_rows(report)
    out = [caption(report), "", "| " + " | ".join(header) + " |"]
    out.append("|" + "|".join("---" for _ in header) + "|")
    out += ["| " + " | ".join(line) + " |" for line in lines]
    errors = [r for r in report["results"] if "error" in r]
    if errors:
        out += ["", *(f"* {r['method']} on {r['problem']}: {r['error']}" for r in errors)]
    return "\n".join(out) + "\n"


def print_table(report: dict) -> None:
    header, lines = _table_rows(report)
    table = Table(title=caption(report), title_justify="left")
    for name in header:
        table.add_column(name, justify="left" if name in ("method", "α") else "right")
    # The best gap per problem in bold.
    best = {}
    for column, _ in enumerate(header[2:-1], start=2):
        numbers = [float(line[column]) for line in lines if line[column] != "error"]
        best[column] = min(numbers) if numbers else None
    for line in lines:
        cells = list(line)
        for column, value in best.items():
            if cells[column] != "error" and value is not None and float(cells[column]) == value:
                cells[column] = f"[bold]{cells[column]}[/bold]"
        table.add_row(*cells)
    console = Console(width=max(100, 40 + 12 * len(header)))
    console.print(table)
    for row in report["results"]:
        if "error" in row:
            console.print(f"{row['method']} on {row['problem']}: {row['error']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    def names(text: str) -> list[str]:
        return [part.strip() for part in text.split(",") if part.strip()]

    parser.add_argument("--problems", type=names, default=list(PROBLEMS))
    parser.add_argument("--methods", type=names, default=["all"], help="comma list, or all")
    parser.add_argument("--solver", choices=("finite", "psl"), default="finite")
    parser.add_argument("--steps", type=int, default=None, help="solver default if not given")
    parser.add_argument("--lr", type=float, default=None, help="solver default if not given")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="a .json or .md file")
    args = parser.parse_args(argv)
    try:
        solver_options(args.solver, args.steps, args.lr, args.optimizer)
        for name in args.problems:
            get_problem(name)
    except ValueError as error:
        parser.error(str(error))
    # Tiny problems: one thread avoids oversubscribing a shared machine (and is faster).
    torch.set_num_threads(1)
    report = run(args)
    print_table(report)
    if args.output is not None:
        text = (
            json.dumps(report, indent=2) if args.output.suffix == ".json" else to_markdown(report)
        )
        with atomic_file(args.output) as tmp:
            Path(tmp).write_text(text)
    return report


if __name__ == "__main__":
    main()
