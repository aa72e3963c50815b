"""PARM training step vs a plain-LoRA ARM step of equal total rank, side by side.

    python evaluation/benchmarks/parm_step.py --repeats 5

Both trainers get the same model, the same batch of preference pairs and the same q/k/v
targets; PBLoRA has r1 + r2 = 8 (r1 = r2 = 4), the LoRA ARM rank 8. A step is TRL's
``training_step`` (forward, losses, aggregation, backward) plus the optimizer step; the two are
timed in alternation so machine noise hits both alike, and the median ratio is printed
(target: PARM ≤ 1.10× the LoRA ARM). Then the total training cost of m GenARM ARMs (one per
objective, each trained on the same pairs for the same steps) against one PARM.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from timing import timed


def make_pairs(tokenizer, n: int, response_tokens: int, learnable: bool = False):
    """Shipped prompts with two answers of about ``response_tokens`` tokens each (the same two
    for every prompt); labels mixed, the second objective preferring the other answer of every
    pair (``learnable``: both objectives prefer the first answer everywhere, a loss any model
    lowers within a few steps)."""
    from align.data import load_prompts, make_preference_dataset

    prompts = [r["prompt"] for r in load_prompts(limit=n)]
    filler = "The answer depends on what you need most, so here is a careful look at it. "
    words = (filler * 20).split()
    first = [" ".join(words[: response_tokens - 8]) for _ in prompts]
    second = [" ".join(words[3 : response_tokens - 5]) for _ in prompts]
    if learnable:
        labels = {"helpful": [0] * n, "harmless": [0] * n}
    else:
        mixed = [i % 2 for i in range(n)]
        labels = {"helpful": mixed, "harmless": mixed[::-1]}
    return make_preference_dataset(prompts, first, second, labels)


def trainer_options(pairs: int, device: str = "cpu", bf16: bool = False) -> dict:
    """The config fields every trainer of these benchmarks shares (one batch of ``pairs``)."""
    return dict(
        output_dir="/tmp/align-bench",
        per_device_train_batch_size=pairs,
        bf16=bf16,
        activation_checkpointing=False,
        use_cpu=torch.device(device).type == "cpu",
        report_to="none",
        disable_dropout=True,
        max_length=256,
        max_prompt_length=96,
    )


def prepare(trainer):
    """Make ``trainer`` ready for bare ``step_time`` calls; returns its first batch."""
    trainer.create_optimizer()
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train(); needed by training_step
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def parm_and_arm(model, tokenizer, pairs, aggregator: str = "linear", **options):
    """``{"PARM": (trainer, batch), "ARM": (trainer, batch)}`` on copies of ``model``: PBLoRA
    r1 = r2 = 4 against a LoRA of the same total rank, r = 8, both on q/k/v."""
    from align.trainers import ARMConfig, ARMTrainer, PARMConfig, PARMTrainer

    parm = PARMTrainer(
        copy.deepcopy(model),
        PARMConfig(aggregator=aggregator, lora_dropout=0.0, **options),
        pairs,
        processing_class=tokenizer,
    )
    arm = ARMTrainer(
        copy.deepcopy(model),
        ARMConfig(objectives=["helpful"], lora_r=8, lora_dropout=0.0, **options),
        pairs,
        processing_class=tokenizer,
    )
    return {name: (trainer, prepare(trainer)) for name, trainer in (("PARM", parm), ("ARM", arm))}


def step_time(trainer, batch, device=None) -> float:
    """One optimizer step (TRL's training_step, then AdamW), synchronised on ``device``."""
    seconds, _ = timed(lambda: optimizer_step(trainer, batch), device)
    return seconds


def optimizer_step(trainer, batch):
    """TRL's training_step (forward, losses, aggregation, backward), then the optimizer; the
    step's loss (a tensor: reading it would synchronise)."""
    loss = trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per batch")
    parser.add_argument("--response-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--aggregator", default="linear")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from align.models import load_model

    model, tokenizer = load_model(args.model)
    pairs = make_pairs(tokenizer, args.pairs, args.response_tokens)
    trainers = parm_and_arm(model, tokenizer, pairs, args.aggregator, **trainer_options(args.pairs))
    parm, arm = trainers["PARM"][0], trainers["ARM"][0]
    batches = {name: batch for name, (_, batch) in trainers.items()}
    timings: dict[str, list[float]] = {"PARM": [], "ARM": []}
    for name, trainer in (("PARM", parm), ("ARM", arm)):  # warm-up
        step_time(trainer, batches[name])
    for _ in range(args.repeats):
        for name, trainer in (("PARM", parm), ("ARM", arm)):
            timings[name].append(step_time(trainer, batches[name]))
    parm_s, arm_s = (statistics.median(timings[k]) for k in ("PARM", "ARM"))
    trainable = {
        name: sum(p.numel() for p in t.model.parameters() if p.requires_grad)
        for name, t in (("PARM", parm), ("ARM", arm))
    }
    tokens = int(batches["PARM"]["attention_mask"].sum())
    m = len(parm.objectives)
    print(
        f"model {args.model}, {args.pairs} pairs per batch ({tokens} tokens), "
        f"{torch.get_num_threads()} threads, {args.repeats} alternating repeats, medians"
    )
    print(
        f"  PARM step (PBLoRA r1=r2=4, {args.aggregator}, {trainable['PARM']:,} params): "
        f"{parm_s:.3f} s"
    )
    print(f"  ARM step  (LoRA r=8, {trainable['ARM']:,} params):                 {arm_s:.3f} s")
    print(f"  ratio PARM / LoRA ARM: {parm_s / arm_s:.3f}x (target <= 1.10x)")
    print(
        f"  training cost of {m} GenARM ARMs vs one PARM, same data and steps: "
        f"{m * arm_s / parm_s:.2f}x (one PARM replaces {m} ARMs)"
    )


if __name__ == "__main__":
    main()
