"""The demo's dataset: real answers of the embedded model, labelled by real offline scorers.

For each shipped prompt the model answers five times: once as asked, and once in each of four
styles (short or detailed, cheerful or gloomy) requested by a line appended to the prompt. The
style request is not stored — the dataset's prompt is the user's prompt alone — so an ARM must
learn from the answers what makes them positive or brief. Every pair of the four styled answers
becomes a row (six per prompt): some pairs differ in tone only, some in length only, some in
both, agreeing or conflicting. Labels come from the scorers, never from the style asked for:

* ``positive``: the answer with the higher VADER compound sentiment (tie below ``tie_sentiment``);
* ``brief``: the answer with fewer tokens (tie below ``tie_tokens``); a non-answer (fewer than
  three words, which the ``brevity`` scorer gives no credit) never wins: against an answer it
  loses, against another non-answer it ties.

The unstyled answers measure how the candidate objectives relate on the model's own outputs
(Pearson and Spearman correlations of the scorers), which is how the objectives were chosen;
the numbers go into the dataset card.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

STYLES = (
    "Reply in one short, cheerful sentence.",
    "Reply in one short sentence, in a gloomy, pessimistic tone.",
    "Reply with a detailed, enthusiastic paragraph.",
    "Reply with a detailed paragraph, in a gloomy, pessimistic tone.",
)
#: Scorers whose correlations on unstyled answers are measured (the candidates).
CANDIDATE_SCORERS = ("positivity", "brevity", "relevance", "harmlessness")


def _label(score_0: float, score_1: float, tie: float) -> int:
    if abs(score_0 - score_1) < tie:
        return -1
    return 0 if score_0 > score_1 else 1


def brief_label(tokens: tuple[int, int], answers: tuple[bool, bool], tie: float) -> int:
    """Which of two responses is briefer: fewer tokens wins, but only a real answer can win
    (the same rule as the ``brevity`` scorer, so labels and evaluation agree)."""
    if answers[0] != answers[1]:
        return 0 if answers[0] else 1
    if not answers[0]:
        return -1
    return _label(-tokens[0], -tokens[1], tie)


def scorer_correlations(
    prompts: Sequence[str], responses: Sequence[str], tokenizer: Any, max_tokens: int
) -> dict[str, Any]:
    """Pearson and Spearman correlations between the candidate scorers on the same answers."""
    from scipy.stats import pearsonr

    from align.scorers import get_scorer
    from align.sweep.report import spearman

    options = {"brevity": {"tokenizer": tokenizer, "max_tokens": max_tokens}}
    scores = {
        name: get_scorer(name, **options.get(name, {})).score(prompts, responses)
        for name in CANDIDATE_SCORERS
    }
    table = {}
    for a, b in itertools.combinations(CANDIDATE_SCORERS, 2):
        constant = np.ptp(scores[a]) == 0 or np.ptp(scores[b]) == 0
        table[f"{a}~{b}"] = {  # NaN when a scorer gives every answer the same score
            "pearson": float("nan")
            if constant
            else float(pearsonr(scores[a], scores[b]).statistic),
            "spearman": spearman(scores[a], scores[b]),
        }
    means = {name: float(np.mean(values)) for name, values in scores.items()}
    return {"answers": len(responses), "means": means, "correlations": table}


def build_demo_dataset(
    model_name: str = "smollm2-135m-instruct",
    *,
    num_prompts: int = 160,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    tie_sentiment: float = 0.05,
    tie_tokens: int = 3,
    seed: int = 0,
    show_progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """``(dataset, card facts)`` for the first ``num_prompts`` shipped prompts."""
    from align.data import load_prompts, make_preference_dataset
    from align.models import load_model
    from align.scorers import get_scorer

    prompts = [record["prompt"] for record in load_prompts(limit=num_prompts)]
    model, tokenizer = load_model(model_name)

    def answer(requests: list[str], offset: int) -> list[str]:
        return _sample_answers(
            model, tokenizer, requests, seed + offset, max_new_tokens, batch_size, show_progress
        )

    plain = answer(prompts, 0)
    styled = [answer([f"{p}\n\n{style}" for p in prompts], 1 + k) for k, style in enumerate(STYLES)]
    correlations = scorer_correlations(prompts, plain, tokenizer, max_new_tokens)
    styled_correlations = scorer_correlations(
        prompts * len(STYLES),
        [text for texts in styled for text in texts],
        tokenizer,
        max_new_tokens,
    )

    positivity = get_scorer("positivity")
    sentiment = [positivity(prompts, texts) for texts in styled]
    lengths = [
        [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for texts in styled
    ]
    real = [get_scorer("brevity").is_answer(texts) for texts in styled]
    rng = random.Random(seed)
    rows: dict[str, list] = {"prompt": [], "response_0": [], "response_1": []}
    labels: dict[str, list[int]] = {"positive": [], "brief": []}
    for i, prompt in enumerate(prompts):
        for a, b in itertools.combinations(range(len(STYLES)), 2):
            if rng.random() < 0.5:  # which style comes first must carry no signal
                a, b = b, a
            rows["prompt"].append(prompt)
            rows["response_0"].append(styled[a][i])
            rows["response_1"].append(styled[b][i])
            labels["positive"].append(_label(sentiment[a][i], sentiment[b][i], tie_sentiment))
            labels["brief"].append(
                brief_label((lengths[a][i], lengths[b][i]), (real[a][i], real[b][i]), tie_tokens)
            )
    dataset = make_preference_dataset(
        rows["prompt"], rows["response_0"], rows["response_1"], labels
    )
    facts = {
        "model": model_name,
        "prompts": len(prompts),
        "pairs": len(dataset),
        "max_new_tokens": max_new_tokens,
        "sampling": "temperature 0.8, top-p 0.95",
        "seed": seed,
        **_label_counts(labels["positive"], labels["brief"]),
        "unstyled_answers": correlations,
        "styled_answers": styled_correlations,
        "styled_mean_tokens": [float(np.mean(x)) for x in lengths],
        "styled_mean_sentiment": [float(np.mean(x)) for x in sentiment],
    }
    return dataset, facts


def _sample_answers(model, tokenizer, requests, seed, max_new_tokens, batch_size, show_progress):
    from align.decoding.plain import generate_responses

    return generate_responses(
        model,
        tokenizer,
        requests,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        seed=seed,
        show_progress=show_progress,
    )


def _label_counts(positive: Sequence[int], brief: Sequence[int]) -> dict[str, Any]:
    positive, brief = np.array(positive), np.array(brief)
    both = (positive != -1) & (brief != -1)
    return {
        "decided": {"positive": int((positive != -1).sum()), "brief": int((brief != -1).sum())},
        "both_decided": int(both.sum()),
        "agree": int((both & (positive == brief)).sum()),
        "conflict": int((both & (positive != brief)).sum()),
    }


def remeasure_demo_dataset(
    path: str | Path, *, batch_size: int = 16, tie_tokens: int = 3, show_progress: bool = True
) -> tuple[Any, dict[str, Any]]:
    """The shipped dataset relabelled and its card re-measured with today's scorers, without
    regenerating the styled answers: ``brief`` labels by :func:`brief_label`; correlations on
    the dataset's styled answers, and on the unstyled answers sampled again exactly as the
    builder sampled them (same prompts, seed and batches). Returns ``(dataset, facts)``."""
    from align.data import load_preference_data, load_prompts, make_preference_dataset
    from align.models import load_model
    from align.scorers import get_scorer

    path = Path(path)
    facts = json.loads(path.with_suffix(".json").read_text())
    rows = load_preference_data(path)
    model, tokenizer = load_model(facts["model"])
    brevity = get_scorer("brevity")
    brief = []
    for first, second in zip(rows["response_0"], rows["response_1"]):
        tokens = [len(t) for t in tokenizer([first, second], add_special_tokens=False)["input_ids"]]
        brief.append(
            brief_label(tuple(tokens), tuple(brevity.is_answer([first, second])), tie_tokens)
        )
    styled = dict.fromkeys(
        (p, r) for key in ("response_0", "response_1") for p, r in zip(rows["prompt"], rows[key])
    )
    prompts = [record["prompt"] for record in load_prompts(limit=facts["prompts"])]
    plain = _sample_answers(
        model, tokenizer, prompts, facts["seed"], facts["max_new_tokens"], batch_size, show_progress
    )
    max_tokens = facts["max_new_tokens"]
    facts.update(
        _label_counts(rows["preferred_positive"], brief),
        unstyled_answers=scorer_correlations(prompts, plain, tokenizer, max_tokens),
        styled_answers=scorer_correlations(
            [p for p, _ in styled], [r for _, r in styled], tokenizer, max_tokens
        ),
    )
    dataset = make_preference_dataset(
        rows["prompt"],
        rows["response_0"],
        rows["response_1"],
        {"positive": list(rows["preferred_positive"]), "brief": brief},
    )
    return dataset, facts


def dataset_card(facts: dict[str, Any]) -> str:
    """The Markdown card written beside the dataset."""
    corr, styled = facts["unstyled_answers"], facts.get("styled_answers")
    lines = [
        "# positive_brief: a two-objective preference dataset made by align",
        "",
        f"{facts['pairs']} pairs over the first {facts['prompts']} of the 300 prompts shipped "
        "with align (`align/resources/prompts.jsonl`, written for the project, ten categories; "
        "the demo evaluates on the last 30, which no dataset uses). Answers sampled from "
        f"`{facts['model']}` ({facts['sampling']}, at most {facts['max_new_tokens']} new "
        f"tokens, seed {facts['seed']}), each asked for one of four styles that are not stored:",
        "",
    ]
    for style, tokens, sentiment in zip(
        STYLES, facts["styled_mean_tokens"], facts["styled_mean_sentiment"]
    ):
        lines.append(f'* "{style}" — mean {tokens:.1f} tokens, mean VADER {sentiment:+.3f}')
    lines += [
        "",
        "Every pair of a prompt's four styled answers is a row (six per prompt, order random).",
        "",
        "| objective | label | decided pairs |",
        "|---|---|---|",
        f"| positive | higher VADER compound sentiment (tie below 0.05) | {facts['decided']['positive']} |",
        f"| brief | fewer tokens (tie below 3); a non-answer (fewer than 3 words) never wins | {facts['decided']['brief']} |",
        "",
        f"Of the {facts['both_decided']} pairs both objectives decide, they prefer the same answer "
        f"in {facts['agree']} and conflict in {facts['conflict']}.",
        "",
        "## Why these objectives",
        "",
        f"Correlations of the candidate scorers (Pearson / Spearman) on {corr['answers']} "
        "unstyled answers of the model (one per prompt, as it answers by itself)"
        + (f" and on the {styled['answers']} styled answers of the dataset" if styled else "")
        + ":",
        "",
        "| scorers | unstyled Pearson | unstyled Spearman |"
        + (" styled Pearson | styled Spearman |" if styled else ""),
        "|---|---|---|" + ("---|---|" if styled else ""),
    ]
    for pair, values in corr["correlations"].items():
        row = f"| {pair.replace('~', ' vs ')} | {values['pearson']:+.3f} | {values['spearman']:+.3f} |"
        if styled:
            other = styled["correlations"][pair]
            row += f" {other['pearson']:+.3f} | {other['spearman']:+.3f} |"
        lines.append(row)
    means = ", ".join(f"{name} {value:.3f}" for name, value in corr["means"].items())
    lines += [
        "",
        f"Mean scores of the unstyled answers: {means}.",
        "",
        _choice_paragraph(corr, styled),
        "",
        "## Remake it",
        "",
        "    python recipes/data/build_positive_brief.py   # ~13 min measured, one thread, shared CPU",
        "",
        "Relabel and re-measure it with today's scorers, keeping its answers:",
        "",
        "    python recipes/data/build_positive_brief.py --remeasure",
        "",
    ]
    return "\n".join(lines)


def _choice_paragraph(unstyled: dict[str, Any], styled: dict[str, Any] | None) -> str:
    """Why positivity and brevity: what the measured correlations say, in words."""
    tables = [unstyled] + ([styled] if styled else [])
    conflicts = [
        pair
        for pair in unstyled["correlations"]
        if all(
            table["correlations"][pair][kind] < 0
            for table in tables
            for kind in ("pearson", "spearman")
        )
    ]
    mean = {
        pair: np.mean([t["correlations"][pair]["pearson"] for t in tables])
        for pair in unstyled["correlations"]
    }
    strongest = min(mean, key=mean.get)
    return (
        "Pairs negatively correlated in every column (a real trade-off on this model's "
        f"answers): {', '.join(p.replace('~', ' vs ') for p in conflicts) or 'none'}; the most "
        f"negative mean Pearson: {strongest.replace('~', ' vs ')} ({mean[strongest]:+.3f}). "
        "The demo trades positivity against brevity: their conflict holds in every column, "
        "both scorers are offline and deterministic, and both can move within a 48-token answer "
        "(relevance barely moves with anything on the unstyled answers, and harmlessness is near "
        "1 for every answer of this model: nothing to trade)."
    )


def write_demo_dataset(dataset: Any, facts: dict[str, Any], path: str | Path) -> Path:
    """The JSONL dataset, its card (``.md``) and facts (``.json``) beside it, each atomic."""
    from align.data import save_preference_dataset
    from align.io import atomic_file

    path = save_preference_dataset(dataset, path)
    with atomic_file(path.with_suffix(".md")) as tmp:
        tmp.write_text(dataset_card(facts))
    with atomic_file(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(facts, indent=2) + "\n")
    return path
