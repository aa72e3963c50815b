"""The demo PARM's training step under the ablation's speed-relevant choices, side by side.

    python evaluation/benchmarks/demo_step.py [--repeats 5] [--threads 2]

The demo's PARM (PBLoRA on q/k/v/o + MLP, 4 pairs of the shipped ``positive_brief`` data per
step) with one α per step and two full rows per pair (the baseline), one α per pair (per-row α
through the adapter), one α per pair with each prompt read once (``share_prompt``: its KV cache
serves both responses; the demo's setting), and one α per pair with the adapter on the top 10
of the 30 layers only (the backward then stops at layer 20, and the frozen layers below need no
gradient). Steps are timed in alternation so
machine noise hits every row alike; medians and the ratio to the baseline are printed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

TOP_10 = r".*\.layers\.2[0-9]\.(self_attn|mlp)\.\w+_proj"
DEMO_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def step_time(trainer, batch) -> float:
    """One optimizer step: TRL's training_step (forward, losses, backward), then AdamW."""
    start = time.perf_counter()
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from align.data import load_preference_data
    from align.demo.pipeline import shipped_dataset
    from align.models import load_model
    from align.trainers import PARMConfig, PARMTrainer

    model, tokenizer = load_model()
    pairs = load_preference_data(shipped_dataset())
    pairs = pairs.select(range(64))
    common = dict(
        output_dir="/tmp/align-bench",
        per_device_train_batch_size=4,
        bf16=False,
        activation_checkpointing=False,
        use_cpu=True,
        report_to="none",
        disable_dropout=True,
        max_length=160,
        max_prompt_length=64,
        beta=0.01,
    )
    pair = dict(preference_sampling="pair", share_prompt=False)
    variants = {
        "one α per step, all 30 layers": dict(target_modules=DEMO_TARGETS, share_prompt=False),
        "one α per pair, all 30 layers": dict(target_modules=DEMO_TARGETS, **pair),
        "  + each prompt read once": dict(
            target_modules=DEMO_TARGETS, **{**pair, "share_prompt": True}
        ),
        "one α per pair, top 10 layers": dict(target_modules=TOP_10, **pair),
    }
    trainers = {}
    for name, options in variants.items():
        trainer = PARMTrainer(
            copy.deepcopy(model), PARMConfig(**common, **options), pairs, processing_class=tokenizer
        )
        trainer.create_optimizer()
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainers[name] = (trainer, batch)
        step_time(trainer, batch)  # warm-up
    timings = {name: [] for name in trainers}
    for _ in range(args.repeats):
        for name, (trainer, batch) in trainers.items():
            timings[name].append(step_time(trainer, batch))
    medians = {name: statistics.median(t) for name, t in timings.items()}
    baseline = next(iter(medians.values()))
    batch = next(iter(trainers.values()))[1]
    tokens = int(batch["attention_mask"].sum())
    full_rows = batch["input_ids"].numel()  # what the model computes, padding included
    shared = batch["prefix_ids"].numel() + batch["continuation_ids"].numel()
    print(
        f"demo PARM step, 4 pairs ({tokens} tokens; positions computed: two full rows per pair "
        f"{full_rows}, prompt read once {shared}), {torch.get_num_threads()} threads, "
        f"{args.repeats} alternating repeats, medians"
    )
    for name, seconds in medians.items():
        print(f"  {name:<34}{seconds:8.2f} s   {seconds / baseline:5.2f}× the first row")


if __name__ == "__main__":
    main()
