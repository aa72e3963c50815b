"""Multi-objective GRPO step time and memory against TRL's own ``GRPOTrainer``, side by side.

    python evaluation/benchmarks/grpo_step.py --repeats 5          # the embedded SmolLM2
    python evaluation/benchmarks/grpo_step.py --tiny --repeats 2   # a smoke run

Every trainer gets the same model, the same 2 prompts × 4 completions × ``--tokens`` new tokens,
the same LoRA (r 8 on q/k/v/o) and learning rate 0, so at each repeat all of them — reseeded
alike — generate the same completions. Timed in alternation, medians printed as ratios:

* **step** (TRL's ``training_step``: generation, rewards, advantages, loss, backward):
  ``mo_grpo`` scalarised at a fixed α vs TRL with ``reward_weights=α`` (target ≤ 1.05×);
* **α per row**: a PBLoRA policy with one α per prompt group vs the same policy at one fixed
  α (the low-rank core per row instead of folded into B; target ≤ 1.05×);
* **loss + backward** on one prepared batch (generation excluded): per-objective MGDA through
  the engine vs its floor, one forward and m backward passes taken by hand (target ≤ 1.10×),
  and vs the scalarised mode's one forward and one backward;
* **peak memory** (``--memory``): each trainer alone in a fresh process, its peak resident
  memory after two steps (CUDA: peak allocated), ``mo_grpo`` scalarised vs TRL (target ≤ 1.10×).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys

import torch
from timing import timed

CONFIGS = ("trl", "scalarized", "per_row", "fixed_row", "mgda")


def rewards():
    def positive(prompts, completions, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [sum(t.count(w) for w in ("good", "great", "happy", "!")) / 3 for t in texts]

    def brief(prompts, completions, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [-len(t.split()) / 30 for t in texts]

    return positive, brief


def build(name: str, model, tokenizer, tokens: int, device: str):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from align.data import load_prompts
    from align.trainers.grpo import MOGRPOConfig, MOGRPOTrainer

    texts = [r["prompt"] for r in load_prompts(limit=2)]
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts]})
    common = dict(
        output_dir="/tmp/align-bench-grpo",
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=tokens,
        learning_rate=0.0,
        activation_checkpointing=False,
        report_to="none",
        use_cpu=device == "cpu",
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    positive, brief = rewards()
    if name == "trl":
        args = GRPOConfig(
            reward_weights=[0.5, 0.5], multi_objective_aggregation="normalize_then_sum", **common
        )
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM")
        return GRPOTrainer(
            copy.deepcopy(model),
            reward_funcs=[positive, brief],
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
        )
    options = {
        "scalarized": dict(preference=[0.5, 0.5]),
        "per_row": dict(policy_adapter="pblora", adapter_rank=4, preference_rank=4),
        "fixed_row": dict(
            policy_adapter="pblora", adapter_rank=4, preference_rank=4, preference=[0.5, 0.5]
        ),
        "mgda": dict(preference=[0.5, 0.5], mode="per_objective", aggregator="mgda"),
    }[name]
    args = MOGRPOConfig(target_modules=targets, lora_alpha=16, **options, **common)
    return MOGRPOTrainer(
        copy.deepcopy(model),
        {"positive": positive, "brief": brief},
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def prepare(trainer) -> None:
    """What ``Trainer.train`` sets up before its first step (a step is timed outside it)."""
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()


def rows(trainer):
    return [trainer.train_dataset[i % 2] for i in (0, 0, 0, 0, 1, 1, 1, 1)]


def step(trainer, seed: int) -> float:
    torch.manual_seed(seed)
    trainer._buffered_inputs = None  # generate anew, as every step of these configs does
    seconds, _ = timed(lambda: trainer.training_step(trainer.model, rows(trainer), None))
    trainer.model.zero_grad(set_to_none=True)
    return seconds


def loss_and_backward(trainer, inputs) -> float:
    def work():
        trainer.compute_loss(trainer.model, inputs).backward()

    seconds, _ = timed(work)
    trainer.model.zero_grad(set_to_none=True)
    return seconds


def floor(trainer, inputs) -> float:
    """One forward shared by the m per-objective losses, then m backward passes by hand."""
    parameters = [p for p in trainer.model.parameters() if p.requires_grad]

    def work():
        trainer._row_preference = inputs["preference"]
        trainer._shared_forward = []
        parts = inputs["objective_advantages"]
        losses = [
            super(type(trainer), trainer)._compute_loss(
                trainer.model, {**inputs, "advantages": parts[:, i]}
            )
            for i in range(parts.shape[1])
        ]
        trainer._shared_forward = None
        for index, loss in enumerate(losses):
            torch.autograd.grad(loss, parameters, retain_graph=index < len(losses) - 1)

    seconds, _ = timed(work)
    return seconds


def load(tiny: bool):
    if tiny:
        from align.testing import tiny_causal_lm

        return tiny_causal_lm(seed=0)
    from align.models import load_model

    return load_model("smollm2-135m-instruct")


def peak_memory(name: str, tiny: bool, tokens: int) -> float:
    """Peak resident memory (MiB) of a fresh process that loads the model and runs two steps."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys, resource; sys.path.insert(0, {here!r}); import grpo_step as b; "
        f"m, t = b.load({tiny!r}); r = b.build({name!r}, m, t, {tokens}, 'cpu'); b.prepare(r); "
        "b.step(r, 0); b.step(r, 1); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="the tiny random model (smoke run)")
    parser.add_argument("--memory", action="store_true", help="also the peak-memory comparison")
    parser.add_argument("--output", help="write the figures as JSON here")
    options = parser.parse_args()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    model, tokenizer = load(options.tiny)
    trainers = {name: build(name, model, tokenizer, options.tokens, "cpu") for name in CONFIGS}
    for trainer in trainers.values():
        prepare(trainer)
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for repeat in range(options.repeats + 1):  # the first round warms up
        for name, trainer in trainers.items():
            seconds = step(trainer, seed=repeat)
            if repeat:
                times[name].append(seconds)
    prepared = {}
    for name in ("scalarized", "mgda"):
        torch.manual_seed(0)
        prepared[name] = trainers[name]._prepare_inputs(rows(trainers[name]))
    loss_times = {"scalarized": [], "mgda": [], "floor": []}
    for repeat in range(options.repeats + 1):
        for name in ("scalarized", "mgda"):
            seconds = loss_and_backward(trainers[name], prepared[name])
            if repeat:
                loss_times[name].append(seconds)
        seconds = floor(trainers["mgda"], prepared["mgda"])
        if repeat:
            loss_times["floor"].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    loss_median = {name: statistics.median(values) for name, values in loss_times.items()}
    figures = {
        "step_s": median,
        "loss_backward_s": loss_median,
        "scalarized_vs_trl": median["scalarized"] / median["trl"],
        "per_row_vs_fixed_alpha": median["per_row"] / median["fixed_row"],
        "mgda_step_vs_trl": median["mgda"] / median["trl"],
        "mgda_vs_floor": loss_median["mgda"] / loss_median["floor"],
        "mgda_vs_scalarized_loss": loss_median["mgda"] / loss_median["scalarized"],
    }
    model_name = "tiny random model" if options.tiny else "SmolLM2-135M-Instruct"
    print(
        f"{model_name}, 2 prompts x 4 completions x {options.tokens} tokens, "
        f"{options.repeats} repeats, torch threads {torch.get_num_threads()}"
    )
    for name in CONFIGS:
        print(f"  step {name:11s} {median[name]:.3f} s")
    for name, value in loss_median.items():
        print(f"  loss+backward {name:11s} {value:.3f} s")
    print(
        f"  scalarised / TRL                 {figures['scalarized_vs_trl']:.3f}x  (target <= 1.05)"
    )
    print(
        f"  α per row / one α (PBLoRA)       {figures['per_row_vs_fixed_alpha']:.3f}x  (target <= 1.05)"
    )
    print(f"  MGDA step / TRL                  {figures['mgda_step_vs_trl']:.3f}x")
    print(f"  MGDA loss+bwd / fwd + m bwd      {figures['mgda_vs_floor']:.3f}x  (target <= 1.10)")
    print(f"  MGDA loss+bwd / scalarised       {figures['mgda_vs_scalarized_loss']:.3f}x")
    if options.memory:
        memory = {
            name: peak_memory(name, options.tiny, options.tokens) for name in ("trl", "scalarized")
        }
        figures["peak_rss_mib"] = memory
        figures["memory_scalarized_vs_trl"] = memory["scalarized"] / memory["trl"]
        print(
            f"  peak RSS TRL {memory['trl']:.0f} MiB, scalarised {memory['scalarized']:.0f} MiB: "
            f"{figures['memory_scalarized_vs_trl']:.3f}x  (target <= 1.10)"
        )
    if options.output:
        with open(options.output, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
