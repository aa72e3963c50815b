"""Benchmark: a route's whole α sweep in one pass against one decoding pass per α, side by side.

    python evaluation/benchmarks/sweep_pass.py --parm demo/parm/final \
        --arms demo/arm-positive/final demo/arm-brief/final --soup demo/soup \
        [--prompts 24] [--grid 10]

For the demo's trained PARM and GenARM ARMs (trained adapters matter: how early answers end
decides what dropping finished rows saves), on the demo's held-out prompts, greedy, 48 tokens:

* ``per α, keep rows``: one ``guided_decode`` per α, every row decoded to the end of the
  longest answer — how the sweep ran before;
* ``per α, drop finished``: the same, rows leaving the batch (and their caches) at EOS;
* ``one pass``: all α together (``repeats=K``), the prompts read once by every model whose
  prompt scores do not depend on α, finished rows dropped.

The rewarded soup (``--soup``: an ``align merge`` sweep of LoRA adapters, as the demo writes)
runs through its sweep route: ``per α`` loads each α's adapter and decodes with ``generate``
(how the sweep ran before); ``one pass`` puts the merge's input adapters on the base at once
and weights each row's updates by its α (the exact interpolation; needs a merge whose inputs
are unchanged since), decoded by align's loop (finished rows leave the batch).

Prints wall time and the ratio to the first row, and checks that all modes give the same answers.
"""

from __future__ import annotations

import argparse
import time

import torch

from align.chat import encode_prompts
from align.decoding import genarm_guidance, guided_decode, parm_guidance
from align.decoding.loading import load_guide
from align.demo.pipeline import EVAL_PROMPT_OFFSET
from align.models import load_model
from align.preference import simplex_grid
from align.sweep.run import load_sweep_prompts


def run(base, tokenizer, guidance, batch, alphas, one_pass: bool, drop: bool, tokens: int):
    options = dict(
        max_new_tokens=tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
        drop_finished=drop,
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    started = time.perf_counter()
    if one_pass:
        rows = alphas.repeat_interleave(ids.shape[0], dim=0)
        out = guided_decode(base, guidance, ids, mask, rows, repeats=len(alphas), **options)
        answers = list(out[:, ids.shape[1] :].split(ids.shape[0]))
    else:
        answers = [
            guided_decode(base, guidance, ids, mask, a, **options)[:, ids.shape[1] :]
            for a in alphas
        ]
    elapsed = time.perf_counter() - started
    return elapsed, [_trim(a, tokenizer.pad_token_id) for a in answers]


def _trim(tokens: torch.Tensor, pad: int) -> list[list[int]]:
    return [[t for t in row.tolist() if t != pad] for row in tokens]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parm", help="a trained PARM adapter folder")
    parser.add_argument("--arms", nargs=2, help="two trained ARM adapter folders (GenARM)")
    parser.add_argument("--soup", help="a merge sweep of LoRA adapters (the demo's soup/)")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--grid", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    base, tokenizer = load_model()
    base.eval()
    prompts = load_sweep_prompts({"offset": EVAL_PROMPT_OFFSET, "limit": args.prompts})
    batch = encode_prompts(tokenizer, prompts)
    alphas = simplex_grid(2, args.grid).float()
    routes = {}
    if args.arms:  # GenARM first: the PARM is then attached to the shared base, and taken off
        arms = [load_guide(a, "smollm2-135m-instruct")[0] for a in args.arms]
        routes["GenARM (m = 2)"] = lambda: genarm_guidance(dict(zip(("a", "b"), arms)), beta=1.0)
    if args.parm:
        routes["PARM (shared base)"] = lambda: parm_guidance(
            load_guide(args.parm, "smollm2-135m-instruct", base_model=base)[0], beta=1.0
        )
    if not routes and not args.soup:
        parser.error("give --parm, --arms and/or --soup")
    print(f"{len(prompts)} prompts × {len(alphas)} α, greedy, {args.new_tokens} new tokens")
    print(f"{'route':<22}{'mode':<24}{'seconds':>10}{'ratio':>8}")
    for name, build in routes.items():
        guidance = build()
        baseline, reference = None, None
        for label, one_pass, drop in (
            ("per α, keep rows", False, False),
            ("per α, drop finished", False, True),
            ("one pass", True, True),
        ):
            seconds, answers = run(
                base, tokenizer, guidance, batch, alphas, one_pass, drop, args.new_tokens
            )
            baseline = baseline or seconds
            reference = reference or answers
            same = "" if answers == reference else "  (tokens differ!)"
            print(f"{name:<22}{label:<24}{seconds:>10.1f}{baseline / seconds:>7.2f}×{same}")
        if guidance.mode == "parm":
            guidance.models[0].unload()  # the base is bare again
    if args.soup:
        soup(args, prompts)


def soup(args, prompts: list[str]) -> None:
    from align.sweep.routes import MergedRoute, Runtime

    generation = {"max_new_tokens": args.new_tokens, "batch_size": len(prompts)}
    route = MergedRoute("soup", ["positive", "brief"], generation, path=args.soup)
    runtime = Runtime("smollm2-135m-instruct")
    alphas = route.alphas(simplex_grid(2, args.grid).numpy())
    if route.interpolated_sources(runtime.base_name) is None:
        raise SystemExit(f"{args.soup}: not a LoRA interpolation whose inputs are unchanged")
    baseline, reference = None, None
    for label, answer_all in (
        ("per α (generate)", lambda: [route.answer(runtime, prompts, a) for a in alphas]),
        ("one pass (α-weighted)", lambda: route.answer_all(runtime, prompts, alphas)),
    ):
        started = time.perf_counter()
        answers = answer_all()
        seconds = time.perf_counter() - started
        baseline = baseline or seconds
        reference = reference or answers
        same = "" if answers == reference else "  (answers differ!)"
        print(f"{'rewarded soup':<22}{label:<24}{seconds:>10.1f}{baseline / seconds:>7.2f}×{same}")


if __name__ == "__main__":
    main()
