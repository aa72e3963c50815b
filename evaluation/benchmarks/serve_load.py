"""Benchmark: ``align serve`` under load — continuous batching against sequential requests.

Starts ``align serve`` on loopback (the embedded SmolLM2 guided by a PARM: ``--parm`` a trained
adapter folder, or an untrained PBLoRA adapter made here, which decodes at the same cost), then
for each concurrency level sends the same ``--requests`` chat requests (the shipped prompts, a
random α each, Dirichlet(1) with a fixed seed, greedy, exactly ``--max-tokens`` new tokens:
EOS ignored) from that many client threads with the official ``openai`` client, and prints

* throughput (new tokens per second of wall time) and its ratio to concurrency 1 — one request
  at a time, i.e. sequential single requests;
* latency of a request, p50 / p90 / p99 (seconds, first byte sent to last byte received);
* requests lost (an error, or not exactly ``--max-tokens`` tokens back): must be 0;
* what the server's batching did (peak rows decoded together, requests that joined a batch
  mid-decoding), from its ``/health``.

The server is stopped at the end (and on any failure).

    python evaluation/benchmarks/serve_load.py [--requests 32] [--concurrency 1 4 16]
        [--max-tokens 32] [--parm FOLDER]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def make_parm(folder: Path) -> Path:
    """An untrained PBLoRA PARM on the embedded model (random B: it changes the scores)."""
    import torch
    from peft import get_peft_model

    from align.adapters import PBLoraConfig
    from align.models import load_model

    model, _ = load_model()
    torch.manual_seed(0)
    config = PBLoraConfig(objectives=["positive", "brief"], init_weights=False, lora_dropout=0.0)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
        return json.loads(response.read())


def start_server(
    parm: Path, port: int, max_batch: int, beta: float, threads: int | None
) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "align.cli",
        "serve",
        "--route",
        f"{{kind: parm, adapter: '{parm}', beta: {beta}}}",
        "--port",
        str(port),
        "--max-batch",
        str(max_batch),
        *(["--threads", str(threads)] if threads else []),
    ]
    return launch_server(command, port, {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})


def launch_server(command: list[str], port: int, env: dict[str, str]) -> subprocess.Popen:
    """Start ``align serve`` (``command``) from the repository root with ``env`` added to this
    process's, and return once its /health answers (at most 600 s)."""
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env})
    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None:
            raise SystemExit(f"align serve exited with status {process.returncode}")
        try:
            health(port)
            return process
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise SystemExit("align serve did not start in 600 s") from None
            time.sleep(0.3)


def run_level(client, model: str, requests: list[dict], concurrency: int, max_tokens: int):
    """Every request sent by ``concurrency`` threads, each sending its next one as soon as its
    last one is answered: ``(wall seconds, latencies, tokens received, requests lost)``."""

    def send(request: dict):
        started = time.perf_counter()
        try:
            answer = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": request["prompt"]}],
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"preference": request["alpha"], "ignore_eos": True},
            )
        except Exception as error:  # counted as lost, and shown
            print(f"  request lost: {type(error).__name__}: {error}", file=sys.stderr)
            return time.perf_counter() - started, 0, True
        tokens = answer.usage.completion_tokens
        return time.perf_counter() - started, tokens, tokens != max_tokens

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(send, requests))
    wall = time.perf_counter() - started
    latencies = np.array([r[0] for r in results])
    return wall, latencies, sum(r[1] for r in results), sum(r[2] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32, help="requests per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--parm", help="a PARM adapter folder on the embedded model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, help="the server's --threads (on a busy machine 1 is steadier)"
    )
    args = parser.parse_args()
    import openai

    from align.data import load_prompts

    rng = np.random.default_rng(args.seed)
    prompts = [record["prompt"] for record in load_prompts(limit=args.requests)]
    requests = [
        {"prompt": prompts[i % len(prompts)], "alpha": [float(w) for w in rng.dirichlet([1, 1])]}
        for i in range(args.requests)
    ]
    for request in requests:  # exactly on the simplex after rounding to JSON
        request["alpha"][1] = 1.0 - request["alpha"][0]
    with tempfile.TemporaryDirectory() as scratch:
        parm = Path(args.parm) if args.parm else make_parm(Path(scratch) / "parm")
        port = free_port()
        server = start_server(parm, port, args.max_batch, args.beta, args.threads)
        try:
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=900
            )
            model = client.models.list().data[0].id
            run_level(client, model, requests[:1], 1, 4)  # warm-up: first-call costs
            print(
                f"align serve, embedded SmolLM2-135M + PARM (β {args.beta}), {args.requests} "
                f"requests per level, greedy, {args.max_tokens} new tokens each, random α; "
                f"server --max-batch {args.max_batch}, --threads {args.threads or 'default'}; "
                f"{os.cpu_count()} CPU cores"
            )
            header = (
                f"{'concurrency':>11}{'seconds':>9}{'tokens/s':>10}{'ratio':>8}"
                f"{'p50 s':>8}{'p90 s':>8}{'p99 s':>8}{'lost':>6}{'peak rows':>11}{'joined':>8}"
            )
            print(header)
            baseline = None
            for concurrency in args.concurrency:
                before = health(port)
                wall, latencies, tokens, lost = run_level(
                    client, model, requests, concurrency, args.max_tokens
                )
                after = health(port)
                throughput = tokens / wall
                baseline = baseline or throughput
                p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
                print(
                    f"{concurrency:>11}{wall:>9.1f}{throughput:>10.1f}{throughput / baseline:>7.2f}×"
                    f"{p50:>8.2f}{p90:>8.2f}{p99:>8.2f}{lost:>6}{after['peak_rows']:>11}"
                    f"{after['joined_running'] - before['joined_running']:>8}",
                    flush=True,
                )
            print("ratio: throughput against concurrency 1 (sequential single requests)")
            print("peak rows: the most requests decoded together so far; joined: requests of the")
            print("level that joined a batch while other rows were mid-decoding")
        finally:
            server.terminate()
            server.wait(60)


if __name__ == "__main__":
    main()
