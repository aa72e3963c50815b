"""The ``align`` command line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from align import __version__

app = typer.Typer(
    help="align: multi-objective alignment of language models along a preference vector α.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


def _version(value: bool) -> None:
    if value:
        console.print(f"align {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """align: multi-objective alignment of language models along a preference vector α."""


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command()
def scorers() -> None:
    """List the registered scorers."""
    from align.scorers import available_scorers

    table = Table("scorer", "what it measures (higher is better)")
    for name, description in available_scorers().items():
        table.add_row(name, description)
    console.print(table)


@app.command()
def demo(
    model: Annotated[
        str, typer.Option(help="Embedded model name, local checkpoint folder or hub id.")
    ] = "smollm2-135m-instruct",
    num_prompts: Annotated[
        int, typer.Option("--num-prompts", "-n", min=1, help="Shipped prompts to answer.")
    ] = 8,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per answer.")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per generation batch.")] = 8,
    scorer_names: Annotated[
        str, typer.Option("--scorers", help="Comma-separated scorer names.")
    ] = "positivity,brevity",
    output: Annotated[Path | None, typer.Option(help="Also write the rows as JSONL here.")] = None,
) -> None:
    """Answer shipped prompts with a model, score every answer on each objective, and show
    which answers are Pareto-optimal."""
    import numpy as np

    from align.data import load_prompts
    from align.decoding import generate_responses
    from align.io import atomic_file
    from align.models import load_model
    from align.pareto import pareto_mask
    from align.scorers import get_scorer

    names = _split(scorer_names)
    if not names:
        raise typer.BadParameter("name at least one scorer", param_hint="--scorers")
    started = time.perf_counter()
    with console.status(f"loading {model} ..."):
        lm, tokenizer = load_model(model)
    # Brevity counts the model's own tokens against the generation budget.
    options = {"brevity": {"tokenizer": tokenizer, "max_tokens": max_new_tokens}}
    try:
        scorer_objects = [get_scorer(name, **options.get(name, {})) for name in names]
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--scorers") from error
    prompts = [record["prompt"] for record in load_prompts(limit=num_prompts)]
    responses = generate_responses(
        lm, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    scores = np.stack([scorer.score(prompts, responses) for scorer in scorer_objects], axis=1)
    on_front = pareto_mask(scores)

    table = Table(
        title=f"{model}: {len(prompts)} answers scored on {', '.join(names)}", show_lines=True
    )
    table.add_column("prompt", max_width=36)
    table.add_column("response", max_width=60)
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("Pareto", justify="center")
    for prompt, response, row, front in zip(prompts, responses, scores, on_front):
        table.add_row(prompt, response, *(f"{value:.3f}" for value in row), "★" if front else "")
    console.print(table)
    means = ", ".join(f"{name} {value:.3f}" for name, value in zip(names, scores.mean(axis=0)))
    console.print(
        f"mean: {means}; {int(on_front.sum())} of {len(prompts)} answers are Pareto-optimal"
    )
    console.print(f"done in {time.perf_counter() - started:.1f} s")

    if output is not None:
        with atomic_file(output) as tmp, tmp.open("w", encoding="utf-8") as handle:
            for prompt, response, row in zip(prompts, responses, scores):
                record = {
                    "prompt": prompt,
                    "response": response,
                    "scores": dict(zip(names, row.tolist())),
                }
                handle.write(json.dumps(record) + "\n")
        console.print(f"wrote {output}")


if __name__ == "__main__":
    app()
