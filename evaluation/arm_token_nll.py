"""How far a trained (P)ARM has drifted from a language model: its mean token NLL on answers.

    python evaluation/arm_token_nll.py demo/parm/final                 # α = (0,1), (0.5,0.5), (1,0)
    python evaluation/arm_token_nll.py demo/arm-brief/final --pairs 100

Guidance adds the ARM's next-token log-probs to the base's. An ARM trained on summed
log-probs can win a "shorter is better" objective by making *every* token unlikely (the margin
of a shorter winner grows with a uniform drop), and such an ARM steers the base into letter
salad. This prints the base's mean token NLL on both answers of the first ``--pairs`` pairs of
the data (each prompt under the chat template, the answer ended by the end-of-turn token) and
the adapter's at each α of a preference adapter (once for a plain ARM). The README's "Three
training seeds" reports it for the demo's PARM; ``nll_weight`` in the trainers is the anchor
against it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "positive_brief.jsonl"


@torch.no_grad()
def mean_token_nll(model, tokenizer, pairs: list[dict]) -> float:
    """Mean NLL per answer token (the end-of-turn token included) over both answers of each
    pair."""
    total, count = 0.0, 0
    for pair in pairs:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": pair["prompt"]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
        for answer in (pair["response_0"], pair["response_1"]):
            answer_ids = tokenizer(
                answer + tokenizer.eos_token, return_tensors="pt", add_special_tokens=False
            ).input_ids
            ids = torch.cat([prompt_ids, answer_ids], dim=1)
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            targets = ids[0, 1:]
            token = log_probs[torch.arange(len(targets)), targets][prompt_ids.shape[1] - 1 :]
            total, count = total - float(token.sum()), count + len(token)
    return total / count


def main(
    adapters: Annotated[list[Path], typer.Argument(help="ARM / PARM adapter folders.")],
    base: Annotated[str, typer.Option(help="The base model they were trained on.")] = (
        "smollm2-135m-instruct"
    ),
    data: Annotated[Path, typer.Option(help="Preference pairs (JSONL).")] = DATA,
    pairs: Annotated[int, typer.Option(help="Pairs read (both answers of each).")] = 40,
) -> None:
    from align.adapters import PreferenceTuner, set_preference
    from align.decoding.loading import load_guide
    from align.models import load_model

    if pairs < 1:
        raise typer.BadParameter(f"--pairs must be >= 1, got {pairs}")
    if not data.is_file():
        raise typer.BadParameter(f"no data at {data}")
    rows = [json.loads(line) for line in data.read_text().splitlines()[:pairs] if line.strip()]
    model, tokenizer = load_model(base)
    model.eval()
    print(f"base {base}: {mean_token_nll(model, tokenizer, rows):.3f} nats / token")
    for folder in adapters:
        guide, _ = load_guide(str(folder), base=base, base_model=model)
        tuner = getattr(guide, "base_model", None)
        if not isinstance(tuner, PreferenceTuner):  # a plain (LoRA) ARM
            print(f"{folder}: {mean_token_nll(guide, tokenizer, rows):.3f}")
        else:
            objectives = tuner.objectives_of()
            if len(objectives) != 2:
                raise typer.BadParameter(f"{folder}: only two-objective adapters are swept")
            for weight in (0.0, 0.5, 1.0):
                alpha = [weight, 1 - weight]
                set_preference(guide, torch.tensor(alpha))
                named = ", ".join(f"{o}={a:g}" for o, a in zip(objectives, alpha))
                print(f"{folder} at α ({named}): {mean_token_nll(guide, tokenizer, rows):.3f}")
        guide.unload()


if __name__ == "__main__":
    typer.run(main)
