"""The demo's dataset with one brevity lesson per prompt: a seed-robustness experiment.

    python evaluation/non_answer_pairs.py recipes/data/positive_brief.jsonl pb_non_answers.jsonl
    python evaluation/parm_ablation.py --out ablation -v demo -v genarm --seed 1 \
        --set data.path=pb_non_answers.jsonl --tag nonanswer

The styled answers of ``positive_brief.jsonl`` are nearly all real answers, so its pairs almost
never show the brevity rule that a non-answer (fewer than three words) never wins ``brief``.
This adds, after each prompt's rows, its shortest real answer (by characters) against that
answer's first one or two words, ``brief`` won by the real answer, ``positive`` undecided. The
README's "Three training seeds" reports what it did (it fixed seed 1 and broke seed 0), and why
the shipped dataset stays without it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated

import typer

from align.data import load_preference_data, make_preference_dataset, save_preference_dataset
from align.scorers import get_scorer


def with_non_answer_pairs(rows: dict[str, list], seed: int = 0) -> dict[str, list]:
    """``rows`` (columns of a positive / brief dataset) with each prompt's lesson after its rows."""
    is_answer = get_scorer("brevity").is_answer
    rng = random.Random(seed)
    blocks: dict[str, list[int]] = {}
    for i, prompt in enumerate(rows["prompt"]):
        blocks.setdefault(prompt, []).append(i)
    out: dict[str, list] = {key: [] for key in rows}
    for prompt, block in blocks.items():
        for i in block:
            for key in rows:
                out[key].append(rows[key][i])
        answers = {rows[key][i] for i in block for key in ("response_0", "response_1")}
        real = [a for a, ok in zip(answers, is_answer(list(answers))) if ok]
        shortest = min(sorted(real), key=len)
        non_answer = " ".join(shortest.split()[: rng.choice([1, 2])])
        first = rng.random() < 0.5  # which side the real answer sits on carries no signal
        pair = (shortest, non_answer) if first else (non_answer, shortest)
        lesson = {"prompt": prompt, "response_0": pair[0], "response_1": pair[1]}
        lesson |= {"preferred_positive": -1, "preferred_brief": 0 if first else 1}
        for key in rows:
            out[key].append(lesson[key])
    return out


def main(
    source: Annotated[Path, typer.Argument(help="A positive / brief preference dataset.")],
    output: Annotated[Path, typer.Argument(help="Where the dataset with the lessons goes.")],
    seed: Annotated[int, typer.Option(help="Seeds the lessons' lengths and sides.")] = 0,
) -> None:
    data = load_preference_data(source)
    rows = with_non_answer_pairs({key: list(data[key]) for key in data.column_names}, seed)
    labels = {o: rows[f"preferred_{o}"] for o in ("positive", "brief")}
    dataset = make_preference_dataset(
        rows["prompt"], rows["response_0"], rows["response_1"], labels
    )
    save_preference_dataset(dataset, output)
    print(f"{len(data)} -> {len(dataset)} pairs, written to {output}")


if __name__ == "__main__":
    typer.run(main)
