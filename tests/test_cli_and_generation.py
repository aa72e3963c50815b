import json

import pytest
from typer.testing import CliRunner

from align.cli import app
from align.data import load_prompts
from align.decoding import generate_responses

runner = CliRunner()


def test_batched_generation_equals_one_prompt_at_a_time(tiny_lm):
    model, tokenizer = tiny_lm
    prompts = ["Hi", "Tell me about the weather on a long rainy day in the city", "Why?"]
    # A random model tends to emit special tokens or repeat whitespace (both decode to ""):
    # keep it on distinct real tokens so the comparison means something.
    kwargs = dict(
        max_new_tokens=6,
        show_progress=False,
        suppress_tokens=tokenizer.all_special_ids,
        no_repeat_ngram_size=1,
    )
    batched = generate_responses(model, tokenizer, prompts, batch_size=3, **kwargs)
    single = [generate_responses(model, tokenizer, [p], **kwargs)[0] for p in prompts]
    assert batched == single  # left padding must not change greedy outputs
    assert all(batched)


def test_shipped_prompts():
    records = load_prompts()
    assert len(records) >= 300 and len({r["id"] for r in records}) == len(records)
    assert {r["category"] for r in load_prompts(limit=10)} == {r["category"] for r in records}
    assert all(r["category"] == "review" for r in load_prompts(categories=["review"]))
    with pytest.raises(ValueError, match="unknown prompt categories"):
        load_prompts(categories=["poetry-slam"])


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "demo" in result.output and "evaluate" in result.output


def test_scorers_command_lists_registry():
    result = runner.invoke(app, ["scorers"])
    assert result.exit_code == 0 and "harmlessness" in result.output


def test_sample_on_the_embedded_model(tmp_path):
    out = tmp_path / "rows.jsonl"
    result = runner.invoke(
        app,
        [
            "sample",
            "-n",
            "3",
            "--max-new-tokens",
            "8",
            "--scorers",
            "positivity,harmlessness",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Pareto-optimal" in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    assert all(
        set(row["scores"]) == {"positivity", "harmlessness"} and row["response"] for row in rows
    )


def test_sample_rejects_unknown_scorers():
    result = runner.invoke(app, ["sample", "--scorers", "positivity,kindness"])
    assert result.exit_code == 2
    assert "unknown scorer 'kindness'" in result.output
