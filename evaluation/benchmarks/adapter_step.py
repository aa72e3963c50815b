"""Benchmark: one forward+backward training step through each adapter on the embedded model.

Compares, side by side in this process (rounds interleaved so machine noise hits all alike):
  * PEFT LoRA, r = 8 (the baseline),
  * PBLoRA r1 = r2 = 4 (align, low-rank path),
  * SVD-LoRA r = 8 (align, low-rank path),
  * PBLoRA rebuilding the dense out×in ΔW(α) on every forward, as PARM's public code does.
All adapt q/k/v with dropout 0; batch 4 × 256 tokens by default. Prints median seconds per step
and the ratio to LoRA.

In a full step the adapters are a small part of the work (SmolLM2's 576x49152 LM head and MLPs
dominate), so a second table times one adapted layer alone, forward+backward, at SmolLM2's
q_proj (576->576) and k_proj (576->192) shapes on the same number of tokens: there the cost of
the adapter itself, and of rebuilding a dense ΔW, is visible.

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


class OneLayer(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.q_proj = torch.nn.Linear(in_features, out_features, bias=False)

    def forward(self, x):
        return self.q_proj(x)


def layer_models(in_features: int, out_features: int) -> dict[str, torch.nn.Module]:
    def fresh():
        torch.manual_seed(0)
        return OneLayer(in_features, out_features)

    lora = get_peft_model(fresh(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]))
    pblora_config = PBLoraConfig(objectives=OBJECTIVES, lora_dropout=0.0, target_modules=["q_proj"])
    pblora = get_peft_model(fresh(), pblora_config)
    svd = get_peft_model(fresh(), SVDLoraConfig(objectives=OBJECTIVES, target_modules=["q_proj"]))
    dense = get_peft_model(fresh(), pblora_config)
    DenseUpdatePBLoraPatch(dense)
    for model in (pblora, svd, dense):
        set_preference(model, [0.3, 0.7])
    return {
        "LoRA r=8": lora,
        "PBLoRA r1=r2=4": pblora,
        "SVD-LoRA r=8": svd,
        "PBLoRA dense ΔW per forward": dense,
    }


def layer_table(tokens: int, rounds: int) -> None:
    for in_features, out_features in ((576, 576), (576, 192)):
        models = layer_models(in_features, out_features)
        x = torch.randn(tokens, in_features, requires_grad=True)

        def run(model, repeats=20, x=x):
            start = time.perf_counter()
            for _ in range(repeats):
                model(x).sum().backward()
            return (time.perf_counter() - start) / repeats

        for model in models.values():
            run(model, 3)
        times = {name: [] for name in models}
        for _ in range(rounds * 3):
            for name, model in models.items():
                times[name].append(run(model))
        lora = statistics.median(times["LoRA r=8"])
        print(f"one {in_features}->{out_features} layer, {tokens} tokens, forward+backward:")
        print(f"  {'adapter':<30}{'median ms':>10}{'vs LoRA':>9}")
        for name in models:
            median = statistics.median(times[name])
            print(f"  {name:<30}{median * 1e3:>10.2f}{median / lora:>8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers-only", action="store_true", help="only the one-layer table")
    args = parser.parse_args()
    if args.layers_only:
        layer_table(args.batch * args.seq, args.rounds)
        return

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
    print()
    layer_table(args.batch * args.seq, args.rounds)


if __name__ == "__main__":
    main()
