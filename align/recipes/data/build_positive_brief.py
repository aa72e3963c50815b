"""Remake ``positive_brief.jsonl`` (and its card ``positive_brief.md``) from real generations.

    python recipes/data/build_positive_brief.py --output recipes/data/positive_brief.jsonl

What it does and why: :mod:`align.demo.dataset`. About 13 minutes measured on one thread of
a shared 2-core CPU (run it with
OMP_NUM_THREADS=1 when other jobs share the cores: oversubscribed threads slow generation
tenfold); the shipped file was made with the defaults.
"""

from __future__ import annotations

import argparse
import json

from align.demo.dataset import build_demo_dataset, remeasure_demo_dataset, write_demo_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="recipes/data/positive_brief.jsonl")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-prompts", type=int, default=160, help="use the first N prompts")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--remeasure",
        action="store_true",
        help="keep the answers of --output; relabel and re-measure the card with today's scorers",
    )
    args = parser.parse_args()
    if args.remeasure:
        dataset, facts = remeasure_demo_dataset(args.output, batch_size=args.batch_size)
    else:
        dataset, facts = build_demo_dataset(
            args.model,
            num_prompts=args.num_prompts,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
        )
    path = write_demo_dataset(dataset, facts, args.output)
    print(json.dumps({k: v for k, v in facts.items() if k != "unstyled_answers"}, indent=2))
    print(json.dumps(facts["unstyled_answers"], indent=2))
    print(f"wrote {len(dataset)} pairs to {path}")


if __name__ == "__main__":
    main()
