"""Two steps of ``MOGRPOTrainer`` on the tiny model, run as one process or under
``accelerate launch`` (DDP / DeepSpeed); writes every run's trained adapter to OUT.

Rollouts are real samples from the policy, but each completion is drawn with its own generator
seeded by (step, prompt, its place in the group), so one process and two processes sample the
same completions and the comparison is of the updates alone (TRL's own sampling draws from each
process's RNG stream, which depends on how the batch is split)::

    python tests/distributed/grpo_run.py MODEL_DIR OUT --batch 8
    accelerate launch --config_file X.yaml tests/distributed/grpo_run.py MODEL_DIR OUT --batch 4
"""

from __future__ import annotations

import argparse
import zlib

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.trainers.grpo import MOGRPOConfig, MOGRPOTrainer

RUNS = {
    "linear": {"mode": "scalarized"},
    "mgda": {"mode": "per_objective", "aggregator": "mgda", "aggregator_accumulation": "full"},
}


def vowels(prompts, completions, **kwargs):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch in "aeiou" for ch in t) / max(1, len(t)) for t in texts]


def shortness(prompts, completions, **kwargs):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [-len(t) / 40 for t in texts]


def seeded_rollout(new_tokens: int):
    @torch.no_grad()
    def rollout(prompts, trainer):
        tokenizer = trainer.processing_class
        model = trainer.accelerator.unwrap_model(trainer.model)
        device = next(model.parameters()).device
        prompt_ids, completion_ids, seen = [], [], {}
        for prompt in prompts:
            text = prompt[-1]["content"]
            place = seen[text] = seen.get(text, -1) + 1
            chat = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
            seed = zlib.crc32(f"{trainer.state.global_step}|{text}|{place}".encode())
            generator = torch.Generator().manual_seed(seed)
            row = torch.tensor([ids], device=device)
            out = []
            for _ in range(new_tokens):
                logits = model(input_ids=row).logits[0, -1].float().cpu()
                token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
                out.append(token)
                if token == tokenizer.eos_token_id:
                    break
                row = torch.cat([row, torch.tensor([[token]], device=device)], dim=1)
            prompt_ids.append(ids)
            completion_ids.append(out)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    return rollout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--runs", default=",".join(RUNS))
    options = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(options.model)
    questions = [f"Question {i}: how was day {i}?" for i in range(16)]
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in questions]})
    results = {}
    for name in options.runs.split(","):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(options.model, dtype=torch.float32)
        args = MOGRPOConfig(
            output_dir=f"{options.out}.{name}",
            per_device_train_batch_size=options.batch,
            num_generations=4,
            max_completion_length=8,
            max_steps=2,
            learning_rate=5e-3,
            lr_scheduler_type="constant",
            max_grad_norm=1.0,
            preference=[0.3, 0.7],
            adapter_rank=4,
            target_modules=["q_proj", "v_proj"],
            activation_checkpointing=False,
            report_to="none",
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            logging_steps=1,
            seed=3,
            **RUNS[name],
        )
        trainer = MOGRPOTrainer(
            model,
            {"vowels": vowels, "short": shortness},
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            rollout_func=seeded_rollout(8),
        )
        trainer.train()
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        results[name] = {
            n: p.detach().cpu().clone() for n, p in unwrapped.named_parameters() if p.requires_grad
        }
    if int(torch.distributed.get_rank() if torch.distributed.is_initialized() else 0) == 0:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        torch.save(
            {
                "runs": results,
                "world_size": world,
                "distributed_type": str(trainer.accelerator.distributed_type),
            },
            options.out,
        )
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


if __name__ == "__main__":
    from align.distributed import leave_process_group

    try:
        main()
    finally:
        leave_process_group()
