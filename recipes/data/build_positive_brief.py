"""Build ``positive_brief.jsonl``: preference pairs for two objectives, from real generations.

For every shipped prompt, the embedded SmolLM2 answers twice, each time asked for a different
style (short or detailed, cheerful or gloomy), so the two answers differ in both tone and length.
The style request is not stored: the dataset's prompt is the user's prompt alone. Labels come from
real scorers, never from the style that was asked for:

* ``preferred_positive``: the answer with the higher VADER compound sentiment (a tie when the
  two differ by less than ``--tie-sentiment``);
* ``preferred_brief``: the answer with fewer tokens (a tie when they differ by fewer than
  ``--tie-tokens``).

    python recipes/data/build_positive_brief.py --output recipes/data/positive_brief.jsonl

Takes about five minutes on a CPU (run it with OMP_NUM_THREADS=1 when other jobs share the
cores: oversubscribed threads slow generation tenfold); the shipped file was made with the
defaults.
"""

from __future__ import annotations

import argparse
import random

from align.data import load_prompts, make_preference_dataset, save_preference_dataset
from align.decoding.plain import generate_responses
from align.models import load_model
from align.scorers import get_scorer

STYLES = (
    "Reply in one short, cheerful sentence.",
    "Reply in one short sentence, in a gloomy, pessimistic tone.",
    "Reply with a detailed, enthusiastic paragraph.",
    "Reply with a detailed paragraph, in a gloomy, pessimistic tone.",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="recipes/data/positive_brief.jsonl")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=160, help="use the first N prompts")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tie-sentiment", type=float, default=0.05)
    parser.add_argument("--tie-tokens", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    prompts = [record["prompt"] for record in load_prompts(limit=args.limit)]
    # Two different styles per prompt; generation is grouped by style so batches share a request.
    pairs = [rng.sample(range(len(STYLES)), 2) for _ in prompts]
    model, tokenizer = load_model(args.model)
    answers: dict[tuple[int, int], str] = {}
    for style_index, style in enumerate(STYLES):
        jobs = [
            (i, slot)
            for i, pair in enumerate(pairs)
            for slot in (0, 1)
            if pair[slot] == style_index
        ]
        texts = generate_responses(
            model,
            tokenizer,
            [f"{prompts[i]}\n\n{style}" for i, _ in jobs],
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            do_sample=True,
            temperature=0.8,
            top_p=0.95,
            seed=args.seed + style_index,
        )
        answers.update({job: text.strip() for job, text in zip(jobs, texts)})

    responses_0 = [answers[(i, 0)] for i in range(len(prompts))]
    responses_1 = [answers[(i, 1)] for i in range(len(prompts))]
    positivity = get_scorer("positivity")
    sentiment_0 = positivity(prompts, responses_0)
    sentiment_1 = positivity(prompts, responses_1)
    length_0 = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in responses_0]
    length_1 = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in responses_1]

    def label(better_0: float, better_1: float, tie: float) -> int:
        if abs(better_0 - better_1) < tie:
            return -1
        return 0 if better_0 > better_1 else 1

    preferred = {
        "positive": [label(a, b, args.tie_sentiment) for a, b in zip(sentiment_0, sentiment_1)],
        "brief": [label(-a, -b, args.tie_tokens) for a, b in zip(length_0, length_1)],
    }
    dataset = make_preference_dataset(prompts, responses_0, responses_1, preferred)
    path = save_preference_dataset(dataset, args.output)
    for objective, labels in preferred.items():
        decided = sum(label_ != -1 for label_ in labels)
        agree = sum(a == b != -1 for a, b in zip(preferred["positive"], preferred["brief"]))
        print(f"{objective}: {decided} of {len(labels)} pairs decided")
    print(f"positive and brief prefer the same answer in {agree} pairs")
    print(f"wrote {len(dataset)} pairs to {path}")


if __name__ == "__main__":
    main()
