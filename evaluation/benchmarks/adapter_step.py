"""Benchmark: one forward+backward training step through each adapter on the embedded model.

Compares, side by side in this process (rounds interleaved so machine noise hits all alike):
  * PEFT LoRA, r = 8 (the baseline),
  * PBLoRA r1 = r2 = 4 (align, low-rank path),
  * SVD-LoRA r = 8 (align, low-rank path),
  * PBLoRA rebuilding the dense out×in ΔW(α) on every forward, as PARM's public code does.
All adapt q/k/v with dropout 0; batch 4 × 256 tokens by default. Prints median seconds per step
and the ratio to LoRA:

    python evaluation/benchmarks/adapter_step.py [--batch 4] [--seq 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from align.adapters import PBLoraConfig, SVDLoraConfig, set_preference
from align.adapters.pblora.layer import PBLoraLayer
from align.models import load_model

TARGETS = ["q_proj", "k_proj", "v_proj"]
OBJECTIVES = ["helpful", "harmless"]


def dense_update_forward(self, x, *args, **kwargs):
    """PBLoRA the reference way: build ΔW(α) densely, then one full out×in matmul."""
    result = self.base_layer(x, *args, **kwargs)
    for adapter in self.active_adapters:
        alpha = self._require_preference(adapter)
        core = self.pblora_core[adapter].matrix(alpha)
        delta = (
            self.pblora_B[adapter].weight
            @ core
            @ self.pblora_A[adapter].weight
            * self.scaling[adapter]
        )
        result = result + F.linear(x, delta)
    return result


class DenseUpdatePBLoraPatch:
    """Swap the forward of every PBLoRA layer of one model for the dense-update version."""

    def __init__(self, model):
        for module in model.modules():
            if isinstance(module, PBLoraLayer):
                module.forward = dense_update_forward.__get__(module)


def build(name):
    base, _ = load_model()
    if name == "LoRA r=8":
        return get_peft_model(
            base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
        )
    if name == "SVD-LoRA r=8":
        model = get_peft_model(
            base, SVDLoraConfig(objectives=OBJECTIVES, r=8, target_modules=TARGETS)
        )
    else:
        config = PBLoraConfig(
            objectives=OBJECTIVES, r1=4, r2=4, lora_dropout=0.0, target_modules=TARGETS
        )
        model = get_peft_model(base, config)
        if name.startswith("PBLoRA dense"):
            DenseUpdatePBLoraPatch(model)
    set_preference(model, [0.3, 0.7])
    return model


def step(model, batch, optimizer):
    start = time.perf_counter()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    names = ["LoRA r=8", "PBLoRA r1=r2=4", "SVD-LoRA r=8", "PBLoRA dense ΔW per forward"]
    models = {name: build(name).train() for name in names}
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for name, m in models.items()
    }
    generator = torch.Generator().manual_seed(0)
    vocab = models[names[0]].config.vocab_size
    batch = torch.randint(0, vocab, (args.batch, args.seq), generator=generator)
    times = {name: [] for name in names}
    for name in names:  # warm-up
        step(models[name], batch, optimizers[name])
    for _ in range(args.rounds):
        for name in names:
            times[name].append(step(models[name], batch, optimizers[name]))

    lora = statistics.median(times[names[0]])
    print(
        f"forward+backward+AdamW step, embedded SmolLM2-135M, batch {args.batch} x {args.seq} tokens, "
        f"{args.rounds} rounds, {torch.get_num_threads()} threads"
    )
    print(f"{'adapter':<30}{'median s':>10}{'min s':>9}{'vs LoRA':>9}")
    for name in names:
        median = statistics.median(times[name])
        print(f"{name:<30}{median:>10.3f}{min(times[name]):>9.3f}{median / lora:>8.2f}x")
    dense = statistics.median(times[names[3]])
    print(
        f"PBLoRA low-rank path is {dense / statistics.median(times[names[1]]):.2f}x faster than the dense-update variant"
    )


if __name__ == "__main__":
    main()
