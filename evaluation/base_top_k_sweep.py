"""The ablation's runs with guidance restricted to the base's k most likely next tokens.

    python evaluation/base_top_k_sweep.py --k 10 --out ablation -v demo -v genarm --seed 1

An experiment, not a feature of align: ARGS-style candidates (only tokens among the base's top k
may be chosen, the guided scores renormalised over them) as a guard against guidance derailing
the base into letter salad, which the PARM does at α = (0, 1) with seed 1. It patches the
per-step combination of :mod:`align.decoding.guided` for PARM and GenARM guidance and runs
:mod:`parm_ablation` into ``OUT/base-top-K`` (the sweep cache does not know of the patch, so
its runs must not share a folder with unpatched ones). The README's "Three training seeds"
reports what it did: the letter salad goes, and so does both routes' brief end.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import torch
import typer

import align.decoding.batch as decoder

sys.path.insert(0, str(Path(__file__).parent))
import parm_ablation  # noqa: E402


def restrict_to_base_top_k(k: int) -> None:
    """Patch the combine_scores the decoder (:mod:`align.decoding.batch`) calls: its first output is the base's log-probs
    for PARM (a separate base, or the shared module's adapter-off copy) and GenARM alike."""
    combine = decoder.combine_scores

    def combine_within_top_k(guidance, forwards, outputs):
        scores = combine(guidance, forwards, outputs)
        if guidance.mode not in ("parm", "genarm"):
            return scores
        base = outputs[0][0]
        kth = base.topk(k, dim=-1).values[:, -1:]
        return torch.log_softmax(scores.masked_fill(base < kth, float("-inf")), dim=-1)

    decoder.combine_scores = combine_within_top_k


def main(
    k: Annotated[int, typer.Option(help="Candidates: the base's k most likely tokens.")] = 10,
    out: Annotated[
        Path, typer.Option(help="The ablation folder; runs go to OUT/base-top-K.")
    ] = Path("ablation"),
    variant: Annotated[list[str], typer.Option("--variant", "-v", help="Variants to run.")] = [  # noqa: B006
        "demo",
        "genarm",
    ],
    seed: Annotated[int, typer.Option(help="Training seed (args.seed).")] = 0,
) -> None:
    if k < 1:
        raise typer.BadParameter(f"--k must be >= 1, got {k}")
    restrict_to_base_top_k(k)
    parm_ablation.main(out=out / f"base-top-{k}", variant=variant, seed=seed)


if __name__ == "__main__":
    typer.run(main)
