"""Benchmark: guided-decoding throughput on the embedded model, side by side, as ratios.

Rows, each generating exactly ``--new-tokens`` tokens per prompt (EOS ignored) with greedy decoding:
  * base only: transformers ``generate`` on the base model (the ceiling),
  * PARM-guided: base + one PARM (the embedded model with a PBLoRA adapter, the same size as the
    base, so 0.5x base throughput is the ideal), batched with per-model KV caches,
  * GenARM with m ARMs (same-size models), batched,
  * the one-prompt-at-a-time PARM loop, as the reference implementations decode (KV caches, but
    one prompt after another; its throughput does not depend on the batch, so it is measured on
    at most ``--loop-prompts`` prompts),
  * PARM with more objectives, to show its cost does not grow with m,
  * PARM = base + adapter on the same weights, base and PARM rows run as one batched forward.

    python evaluation/benchmarks/guided_decoding.py [--batch-sizes 1 8 32] [--new-tokens 128]
"""

from __future__ import annotations

import argparse

import torch
from peft import get_peft_model
from timing import timed

from align.adapters import PBLoraConfig
from align.chat import encode_prompts
from align.data import load_prompts
from align.decoding import genarm_guidance, guided_decode, parm_guidance
from align.models import load_model


def make_parm(num_objectives: int, model=None):
    """A PBLoRA PARM with random (nonzero) factors on ``model`` (default: the embedded model)."""
    if model is None:
        model, _ = load_model()
    objectives = [f"objective_{i}" for i in range(num_objectives)]
    config = PBLoraConfig(objectives=objectives, init_weights=False, lora_dropout=0.0)
    return get_peft_model(model, config).eval(), objectives


def timed_guided(
    base, tokenizer, guidance, prompts, alpha, new_tokens, device=None, vocab_size=None
) -> float:
    """Tokens/s of ``guided_decode`` (synchronised on ``device``; ``vocab_size``: the scored
    vocabulary, default the tokenizer's)."""
    batch = encode_prompts(tokenizer, prompts)
    if device is not None:
        batch = batch.to(device)
    elapsed, out = timed(
        lambda: guided_decode(
            base,
            guidance,
            batch["input_ids"],
            batch["attention_mask"],
            alpha,
            max_new_tokens=new_tokens,
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
            vocab_size=vocab_size or len(tokenizer),
        ),
        device,
    )
    assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens
    return len(prompts) * new_tokens / elapsed


def timed_base(base, tokenizer, prompts, new_tokens, device=None) -> float:
    """Tokens/s of transformers ``generate`` (greedy, EOS ignored), synchronised on ``device``."""
    batch = encode_prompts(tokenizer, prompts)
    if device is not None:
        batch = batch.to(device)

    def generate():
        with torch.inference_mode():
            return base.generate(
                **batch,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )

    elapsed, out = timed(generate, device)
    assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens
    return len(prompts) * new_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--loop-prompts", type=int, default=4)
    parser.add_argument(
        "--m-values", type=int, nargs="+", default=[2, 4], help="objectives for PARM / GenARM"
    )
    args = parser.parse_args()

    base, tokenizer = load_model()
    parms = {m: make_parm(m) for m in args.m_values}
    arm, _ = load_model()  # GenARM ARMs: same-size models; one set of weights, a cache per ARM
    prompts = [r["prompt"] for r in load_prompts(limit=max(args.batch_sizes))]
    first = args.m_values[0]
    timed_guided(
        base, tokenizer, parm_guidance(parms[first][0]), prompts[:2], [1.0 / first] * first, 4
    )  # warm-up

    print(
        f"greedy, {args.new_tokens} new tokens per prompt, embedded SmolLM2-135M as base and guides, "
        f"{torch.get_num_threads()} threads; tokens/s (ratio to base-only generate at that batch)"
    )
    header = f"{'method':<34}" + "".join(f"{'batch ' + str(b):>20}" for b in args.batch_sizes)
    print(header)
    results: dict[str, dict[int, float]] = {}

    def row(name, measure):
        results[name] = {}
        for b in args.batch_sizes:
            results[name][b] = measure(b)
        base_rates = results.get("base only (transformers generate)", results[name])
        cells = "".join(
            f"{results[name][b]:>10.1f} ({results[name][b] / base_rates[b]:>4.2f}x)"
            for b in args.batch_sizes
        )
        print(f"{name:<34}{cells}", flush=True)

    row(
        "base only (transformers generate)",
        lambda b: timed_base(base, tokenizer, prompts[:b], args.new_tokens),
    )
    for m in args.m_values:
        parm, objectives = parms[m]
        alpha = [1.0 / m] * m
        row(
            f"PARM-guided, m={m}",
            lambda b, p=parm, a=alpha: timed_guided(
                base, tokenizer, parm_guidance(p), prompts[:b], a, args.new_tokens
            ),
        )
    shared_parm, _ = make_parm(first)  # the PARM's own base decodes: one batched forward per step
    shared_base = shared_parm.get_base_model()
    row(
        f"PARM-guided, m={first}, base shared",
        lambda b: timed_guided(
            shared_base,
            tokenizer,
            parm_guidance(shared_parm),
            prompts[:b],
            [1.0 / first] * first,
            args.new_tokens,
        ),
    )
    for m in args.m_values:
        arms = {f"objective_{i}": arm for i in range(m)}
        alpha = [1.0 / m] * m
        row(
            f"GenARM, m={m} ARMs",
            lambda b, g=genarm_guidance(arms), a=alpha: timed_guided(
                base, tokenizer, g, prompts[:b], a, args.new_tokens
            ),
        )

    parm, _ = parms[args.m_values[0]]
    alpha = [1.0 / args.m_values[0]] * args.m_values[0]

    # A sequential loop's throughput does not depend on how many prompts wait: measure it once.
    count = args.loop_prompts
    rates = [
        timed_guided(base, tokenizer, parm_guidance(parm), [p], alpha, args.new_tokens)
        for p in prompts[:count]
    ]
    loop_rate = len(rates) / sum(1 / r for r in rates)  # tokens over total time
    row(f"PARM one prompt at a time, m={args.m_values[0]}", lambda b: loop_rate)

    first_m, last_m = args.m_values[0], args.m_values[-1]
    base_only = results["base only (transformers generate)"]
    parm = results[f"PARM-guided, m={first_m}"]
    shared = results[f"PARM-guided, m={first_m}, base shared"]
    loop = results[f"PARM one prompt at a time, m={first_m}"]
    for b in args.batch_sizes:
        print(
            f"batch {b}: PARM-guided / base-only = {parm[b] / base_only[b]:.2f}x "
            f"(base shared: {shared[b] / base_only[b]:.2f}x); "
            f"PARM batched / one-prompt-at-a-time = {parm[b] / loop[b]:.2f}x "
            f"(base shared: {shared[b] / loop[b]:.2f}x)"
        )
    b = args.batch_sizes[-1]
    print(
        f"batch {b}: PARM m={last_m} / m={first_m} throughput = "
        f"{results[f'PARM-guided, m={last_m}'][b] / parm[b]:.2f}x; GenARM m={last_m} / m={first_m} = "
        f"{results[f'GenARM, m={last_m} ARMs'][b] / results[f'GenARM, m={first_m} ARMs'][b]:.2f}x"
    )


if __name__ == "__main__":
    main()
