"""Benchmark: loading the embedded model from its safetensors cache vs. from the GGUF file.

Both are timed in this one process, side by side, and the ratio printed:

    python evaluation/benchmarks/model_load.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from align.models import embedded_gguf_path, embedded_model_path, load_model


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    embedded_model_path()  # make sure the cache exists; its one-off creation is not timed
    gguf = embedded_gguf_path()
    cached = timed(lambda: load_model(), args.repeats)
    from_gguf = timed(
        lambda: AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        ),
        args.repeats,
    )
    print(f"{'load path':<34}{'median s':>10}")
    print(f"{'GGUF (transformers, every load)':<34}{from_gguf:>10.2f}")
    print(f"{'align cache (safetensors)':<34}{cached:>10.2f}")
    print(f"cached load is {from_gguf / cached:.1f}x faster than de-quantising GGUF")


if __name__ == "__main__":
    main()
