"""Benchmark: the embedded model's one-time GGUF → safetensors conversion, with the GGUF file
parsed once against transformers' three parses, side by side.

    python evaluation/benchmarks/embedded_conversion.py [--repeats 2]

Runs alternate between the two modes (so machine noise hits both alike), each into a fresh
temporary folder; prints the median wall time of each and the ratio, and checks that both
write the same weights.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from align.models.loading import EMBEDDED_MODEL, EMBEDDED_MODELS, convert_gguf, embedded_gguf_path


def convert(parse_once: bool, out: Path) -> float:
    started = time.perf_counter()
    convert_gguf(embedded_gguf_path(), EMBEDDED_MODELS[EMBEDDED_MODEL], out, parse_once)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    times: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for parse_once in (False, True):
                times[parse_once].append(convert(parse_once, Path(tmp) / f"{parse_once}-{repeat}"))
        weights = [load_file(Path(tmp) / f"{m}-0" / "model.safetensors") for m in (False, True)]
    same = weights[0].keys() == weights[1].keys() and all(
        weights[0][k].equal(weights[1][k]) for k in weights[0]
    )
    three, once = (statistics.median(times[m]) for m in (False, True))
    print(f"GGUF conversion of {EMBEDDED_MODEL}, {args.repeats} alternating repeats, medians")
    print(f"  parsed by transformers (3×)  {three:7.1f} s")
    print(f"  parsed once                  {once:7.1f} s   {three / once:.2f}× faster")
    print(f"  same weights: {same}")


if __name__ == "__main__":
    main()
