"""What makes a PARM learn its α-dependence within the demo's budget: an ablation on the demo.

    python evaluation/parm_ablation.py --out ablation                # every variant
    python evaluation/parm_ablation.py --out ablation -v pair -v genarm
    python evaluation/parm_ablation.py --out ablation -v pair --seed 1   # the same, trained with seed 1
    python evaluation/parm_ablation.py --out ablation -v demo -v genarm \
        --set data.path=other.jsonl --tag other-data   # both routes with an override, as "+other-data"
    python evaluation/parm_ablation.py --out ablation --render       # the table of what is done

Each variant is a set of overrides of ``recipes/parm_cpu.yaml`` (or ``genarm``: the two
GenARM ARMs of ``recipes/genarm_cpu.yaml`` at the same pairs budget), trained on the shipped
``positive_brief`` data exactly as ``align demo`` trains it, then swept over α on the demo's
held-out prompts (the last shipped prompts, which no dataset uses), greedy, 48 tokens, and
scored on the demo's fixed scale (positivity [-1, 1], brevity [0, 1] with no credit for a
non-answer): hypervolume, MIP, Spearman ρ per objective, and the wall time of training and of
the sweep. Every stage is cached under ``--out`` (training by its settings, generations by the
adapter's content), so a re-run only does what is new, and ``--render`` re-scores what exists.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()

#: The PARM recipe before this ablation (one α per training step, PBLoRA r1 = r2 = 4, alpha 8,
#: Θ at the shared learning rate): the earlier variants change it, so their rows keep their
#: meaning now that ``parm_cpu.yaml`` is the ablation's result.
BEFORE = [
    "args.preference_sampling=batch",
    "args.alpha_path_lr_ratio=1",
    "args.pblora_r2=4",
    "args.lora_alpha=8",
]
PAIR = "args.preference_sampling=pair"

#: name → (what it changes, overrides of parm_cpu.yaml). "genarm" is the baseline to beat.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "recipe": ("the recipe before this ablation: one α per step, Dirichlet(0.5)", BEFORE),
    "pair": ("one α per pair", [*BEFORE, PAIR]),
    "pair-c1": ("one α per pair, Dirichlet(1)", [*BEFORE, PAIR, "args.preference_concentration=1"]),
    "pair-theta10": ("one α per pair, Θ's lr ×10", [*BEFORE, PAIR, "args.alpha_path_lr_ratio=10"]),
    "pair-theta10-c1": (
        "one α per pair, Θ's lr ×10, Dirichlet(1)",
        [*BEFORE, PAIR, "args.alpha_path_lr_ratio=10", "args.preference_concentration=1"],
    ),
    "pair-parm-init": (
        "one α per pair, PARM's Θ init",
        [*BEFORE, PAIR, "args.pblora_theta_init=parm"],
    ),
    "pair-r2-8": (
        "one α per pair, r1 4 / r2 8",
        [*BEFORE, PAIR, "args.pblora_r2=8", "args.lora_alpha=16"],
    ),
    "pair-lr2e-3": ("one α per pair, lr 2e-3", [*BEFORE, PAIR, "args.learning_rate=2e-3"]),
    "pair-attn": (
        "one α per pair, attention only (q/k/v/o)",
        [*BEFORE, PAIR, "args.target_modules=[q_proj,k_proj,v_proj,o_proj]"],
    ),
    "theta10": ("one α per step, Θ's lr ×10", [*BEFORE, "args.alpha_path_lr_ratio=10"]),
    "pair-theta30": ("one α per pair, Θ's lr ×30", [*BEFORE, PAIR, "args.alpha_path_lr_ratio=30"]),
    "pair-top10": (
        "one α per pair, adapters on the top 10 of 30 layers only (a shorter backward)",
        [*BEFORE, PAIR, r"args.target_modules=.*\.layers\.2[0-9]\.(self_attn|mlp)\.\w+_proj"],
    ),
    # The demo's recipe (one α per pair, Θ's lr ×10, r1 4 / r2 8) and changes of it.
    "demo": ("the demo's PARM (parm_cpu.yaml): one α per pair, Θ's lr ×10, r1 4 / r2 8", []),
    "demo-theta30": ("the demo's PARM, Θ's lr ×30", ["args.alpha_path_lr_ratio=30"]),
    "demo-c0.25": ("the demo's PARM, Dirichlet(0.25)", ["args.preference_concentration=0.25"]),
    "demo-nll0.003": (
        "the demo's PARM, a language-model anchor λ 0.003",
        ["args.nll_weight=0.003"],
    ),
    "demo-nll0.01": ("the demo's PARM, a language-model anchor λ 0.01", ["args.nll_weight=0.01"]),
    "demo-nll0.1": ("the demo's PARM, a language-model anchor λ 0.1", ["args.nll_weight=0.1"]),
    "genarm": ("GenARM: two LoRA ARMs, half the steps each", []),
}


def _sweep(name: str, route: dict, out: Path, prompts: int, grid: int) -> dict:
    from align.demo.pipeline import EVAL_PROMPT_OFFSET
    from align.sweep import SweepConfig, run_sweep

    config = SweepConfig(
        base="smollm2-135m-instruct",
        objectives=["positive", "brief"],
        scorers={"positive": "positivity", "brief": "brevity"},
        routes=[route],
        output=str(out / "report"),
        prompts={"offset": EVAL_PROMPT_OFFSET, "limit": prompts},
        grid=grid,
        generation={"max_new_tokens": 48, "batch_size": 24, "do_sample": False},
        title=f"ablation: {name}",
    )
    return run_sweep(config, show_progress=False)


def run_variant(
    name: str,
    out: Path,
    steps: int,
    prompts: int,
    grid: int,
    beta: float,
    seed: int = 0,
    overrides: tuple[str, ...] = (),
    tag: str = "",
) -> dict:
    from align.demo.pipeline import DemoConfig, demo_dataset, train_stage

    folder = out / (f"{name}@{steps}" + (f"+{tag}" if tag else "")) / f"seed-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    config = DemoConfig(output=str(folder), seed=seed, overrides=overrides)
    data = demo_dataset(config, folder)
    started = time.perf_counter()
    if name == "genarm":
        arms = {
            o: str(
                train_stage(
                    config,
                    "genarm_cpu.yaml",
                    folder / f"arm-{o}",
                    data,
                    [f"args.objectives=[{o}]", f"args.max_steps={steps // 2}"],
                )
            )
            for o in ("positive", "brief")
        }
        route = {"name": name, "kind": "genarm", "arms": arms, "beta": beta}
    else:
        parm = train_stage(
            config,
            "parm_cpu.yaml",
            folder / "parm",
            data,
            [f"args.max_steps={steps}", *VARIANTS[name][1]],
        )
        route = {"name": name, "kind": "parm", "adapter": str(parm), "beta": beta}
    trained = _remember(folder / "train_seconds.json", time.perf_counter() - started)
    started = time.perf_counter()
    sweep = folder / f"beta-{beta:g}-prompts-{prompts}-grid-{grid}"
    report = _sweep(name, route, sweep, prompts, grid)
    swept = _remember(sweep / "sweep_seconds.json", time.perf_counter() - started)
    summary = {
        "variant": name + (f"+{tag}" if tag else ""),
        "what": VARIANTS[name][0] + "".join(f"; {o}" for o in overrides),
        "steps": steps,
        "seed": seed,
        "beta": beta,
        "prompts": prompts,
        "grid": grid,
        "metrics": report["metrics"]["routes"][name],
        "means": report["routes"][name]["means"],
        "alphas": report["routes"][name]["alphas"],
        "train_s": trained,
        "sweep_s": swept,
    }
    (sweep / "ablation.json").write_text(json.dumps(summary, indent=2))
    return summary


def _remember(path: Path, seconds: float) -> float:
    """The time of the run that did the work: a cached re-run (a few seconds) keeps it."""
    if seconds < 10 and path.is_file():
        return json.loads(path.read_text())["seconds"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seconds": seconds}))
    return seconds


COLUMNS = (
    "variant",
    "what",
    "steps",
    "seed",
    "prompts × α",
    "β",
    "HV",
    "MIP",
    "ρ positive",
    "ρ brief",
    "α=(0,1) brief",
    "α=(1,0) positive",
    "train s",
    "sweep s",
)


def _rows(out: Path) -> list[list[str]]:
    rows = []
    for path in sorted(out.glob("*/seed-*/*/ablation.json")):
        s = json.loads(path.read_text())
        m = s["metrics"]
        rho = m.get("spearman", {})
        rows.append(
            [
                s["variant"],
                s["what"],
                str(s["steps"]),
                str(s["seed"]),
                f"{s['prompts']} × {s['grid'] + 1}",
                f"{s['beta']:g}",
                f"{m['hypervolume']:.3f}",
                f"{m.get('mip', float('nan')):.3f}",
                f"{rho.get('positive', float('nan')):.3f}",
                f"{rho.get('brief', float('nan')):.3f}",
                f"{s['means'][0][1]:.3f}",
                f"{s['means'][-1][0]:.3f}",
                f"{s['train_s']:.0f}",
                f"{s['sweep_s']:.0f}",
            ]
        )
    return rows


def render(out: Path, markdown: bool = False) -> None:
    rows = _rows(out)
    if markdown:
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    table = Table(title=f"PARM ablation ({out})")
    for column in COLUMNS:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def main(
    out: Annotated[Path, typer.Option(help="Folder for every variant's runs and sweeps.")] = Path(
        "ablation"
    ),
    variant: Annotated[
        list[str] | None, typer.Option("--variant", "-v", help="Variants to run (default: all).")
    ] = None,
    # The defaults are the demo's: 40 steps, every held-out prompt (30) at 11 α, β 0.75.
    steps: Annotated[int, typer.Option(help="PARM steps (GenARM: half per ARM).")] = 40,
    prompts: Annotated[int, typer.Option(help="Held-out prompts answered.")] = 30,
    grid: Annotated[int, typer.Option(help="Simplex divisions (10: 11 α).")] = 10,
    beta: Annotated[float, typer.Option(help="Decoding β.")] = 0.75,
    seed: Annotated[int, typer.Option(help="Training seed (args.seed).")] = 0,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="A recipe override for every training stage (needs --tag)."),
    ] = None,
    tag: Annotated[str, typer.Option(help="Names the runs made with --set.")] = "",
    render_only: Annotated[bool, typer.Option("--render", help="Only print the table.")] = False,
    markdown: Annotated[bool, typer.Option(help="Print the table as Markdown.")] = False,
) -> None:
    if overrides and not tag:
        raise typer.BadParameter("--set needs --tag: the runs it makes are kept apart by it")
    if not render_only:
        names = variant or list(VARIANTS)
        unknown = sorted(set(names) - set(VARIANTS))
        if unknown:
            raise typer.BadParameter(f"unknown variants {unknown}; known: {list(VARIANTS)}")
        for name in names:
            console.print(f"[bold]{name}[/bold]: {VARIANTS[name][0]}")
            summary = run_variant(
                name, out, steps, prompts, grid, beta, seed, tuple(overrides or ()), tag
            )
            console.print(
                summary["metrics"],
                f"train {summary['train_s']:.0f} s, sweep {summary['sweep_s']:.0f} s",
            )
    render(out, markdown)


if __name__ == "__main__":
    typer.run(main)
