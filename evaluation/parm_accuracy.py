"""Per-objective pairwise accuracy of a trained PARM over the α grid, on held-out pairs.

    python evaluation/parm_accuracy.py runs/parm-cpu

reads ``runs/parm-cpu/final`` (the adapter), ``runs/parm-cpu/held_out.jsonl`` (written by
``align train``) and the base model named in the adapter config, scores both responses of
every pair at each α of the simplex grid (11 points for two objectives) as the PARM's training
record ``align_training.json`` says (summed or length-normalised log-probs, the same maximum
lengths), and prints, per α, the share
of decided pairs each objective's preference is reproduced in. A PARM that learned the
trade-off is most accurate on objective i near α = e_i. The first row is the base model (the
adapter off): what the PARM must beat. The "alone" columns count only the pairs where every
other objective ties, so one objective's signal is not hidden by another's (a summed log-prob
ranks the shorter answer higher whatever its tone). Also prints the training time per step
from the run's ``trainer_state.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

console = Console()


def pairwise_accuracy(
    rewards_0: torch.Tensor,
    rewards_1: torch.Tensor,
    preferred: list[int],
    among: torch.Tensor | None = None,
) -> float:
    """Share of decided pairs (label 0 or 1) where the higher reward is the preferred answer;
    ``among`` restricts it to a subset of the pairs (a boolean mask)."""
    labels = torch.tensor(preferred)
    decided = labels != -1
    if among is not None:
        decided &= among
    if not decided.any():
        return float("nan")
    predicted = (rewards_1 > rewards_0).long()
    return (predicted[decided] == labels[decided]).float().mean().item()


def seconds_per_step(run: Path) -> float | None:
    """Training time per optimizer step, from the newest trainer_state.json of the run."""
    states = sorted(run.glob("checkpoint-*/trainer_state.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return None
    state = json.loads(states[-1].read_text())
    runtime = next((e["train_runtime"] for e in state["log_history"] if "train_runtime" in e), None)
    steps = state.get("global_step") or 0
    return runtime / steps if runtime and steps else None


def main(
    run: Annotated[Path, typer.Argument(help="The output_dir of a PARM training run.")],
    adapter: Annotated[
        Path | None, typer.Option(help="Adapter folder (default RUN/final).")
    ] = None,
    pairs: Annotated[
        Path | None, typer.Option(help="Held-out pairs JSONL (default RUN/held_out.jsonl).")
    ] = None,
    points: Annotated[int, typer.Option(help="Grid divisions: 10 gives 11 α for m = 2.")] = 10,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    limit: Annotated[int | None, typer.Option(help="Score only the first N pairs.")] = None,
    output: Annotated[Path | None, typer.Option(help="Also write the table as JSON here.")] = None,
) -> None:
    from align.adapters import objectives_of
    from align.data import load_schema
    from align.decoding.loading import load_guide
    from align.preference import simplex_grid
    from align.rewards import arm_rewards, reward_settings

    adapter = adapter or run / "final"
    pairs = pairs or run / "held_out.jsonl"
    model, tokenizer = load_guide(str(adapter))
    model.eval()
    # Score as the PARM was trained to (summed or mean log-probs, the same truncation).
    settings = reward_settings(adapter)
    objectives = objectives_of(model)
    data = load_schema(pairs, objectives)
    if limit:
        data = data.select(range(min(limit, len(data))))
    grid = simplex_grid(len(objectives), points)
    labels = {name: torch.tensor(data[f"preferred_{name}"]) for name in objectives}
    alone = {
        name: torch.stack([labels[o] == -1 for o in objectives if o != name]).all(dim=0)
        for name in objectives
    }
    table = Table(title=f"PARM pairwise accuracy on {len(data)} held-out pairs ({adapter})")
    table.add_column("α")
    for name in objectives:
        table.add_column(f"{name}", justify="right")
    for name in objectives:
        decided = int(((labels[name] != -1) & alone[name]).sum())
        table.add_column(f"{name} alone ({decided} pairs)", justify="right")
    rows = []

    def score(alpha: torch.Tensor | None) -> dict[str, dict[str, float]]:
        scores = [
            arm_rewards(
                model,
                tokenizer,
                data["prompt"],
                data[f"response_{k}"],
                batch_size=batch_size,
                **settings,
                **({} if alpha is None else {"pref": alpha}),
            )
            for k in (0, 1)
        ]
        return {
            "accuracy": {n: pairwise_accuracy(*scores, data[f"preferred_{n}"]) for n in objectives},
            "alone": {
                n: pairwise_accuracy(*scores, data[f"preferred_{n}"], alone[n]) for n in objectives
            },
        }

    def add_row(label: str, result: dict[str, dict[str, float]]) -> None:
        table.add_row(
            label,
            *(f"{result['accuracy'][n]:.3f}" for n in objectives),
            *(f"{result['alone'][n]:.3f}" for n in objectives),
        )

    with model.disable_adapter():
        base = score(None)
    add_row("base (adapter off)", base)
    for alpha in grid:
        result = score(alpha)
        rows.append({"preference": [round(float(a), 6) for a in alpha], **result})
        add_row("(" + ", ".join(f"{float(a):.1f}" for a in alpha) + ")", result)
    console.print(table)
    per_step = seconds_per_step(run)
    if per_step is not None:
        console.print(f"training time: {per_step:.2f} s per optimizer step")
    if output:
        output.write_text(
            json.dumps({"objectives": list(objectives), "base": base, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    typer.run(main)
