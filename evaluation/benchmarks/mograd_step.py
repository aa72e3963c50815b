"""Benchmark: one multi-objective training step through the engine on the embedded model.

SmolLM2-135M-Instruct with a PBLoRA adapter (r1 = r2 = 4, dropout 0; on q/k/v, or with
``--targets all`` on every linear layer of the blocks: q/k/v/o and the MLP's gate/up/down),
m objectives, one row of ``--seq`` tokens per objective (objective i: the next-token loss of its own text). Each
configuration does forward → losses → engine → backward of the returned scalar (no optimizer
step); rounds are interleaved so that machine noise hits all alike, and the median is reported.

* ``LS``, ``STCH``: loss-level, one backward;
* ``MGDA``, ``PCGrad``: gradient-level, m ``autograd.grad`` passes + the injected update;
* ``Gram-L2O``: the learned weights from the Gram (``gram_l2o``, guarded), the same path as MGDA;
* ``GML2O``: the coordinate-wise learned optimizer (update-level: the network runs on every
  coordinate; float16 recurrent state);
  ``MGDA batched``: one vmapped ``autograd.grad`` for the m objectives;
* ``MGDA feature (h)`` / ``(logits)``: feature-level MGDA-UB with the final hidden states / the
  logits as the shared representation (one model backward);
* ``torchjd MGDA``: ``torchjd.autojac.backward`` + ``jac_to_grad(params, MGDA())`` on the same
  model and parameters (vmapped by default; ``seq`` = ``parallel_chunk_size=1``);
* ``fwd + m bwd``: forward and m ``autograd.grad`` passes and nothing else — the floor of any
  exact gradient-level step.

Columns: median CPU seconds of this process per step (``time.process_time``; one torch thread
by default, so that on a shared machine it measures the work done and not the waiting) and
median wall seconds, the ratios to LS and to ``fwd + m bwd`` (from CPU time), the method's
solver (weights from the Gram; wall time) in ms and as a share of the step's CPU time, and
the peak resident memory of the step above the memory before it (Linux: VmHWM reset through
/proc/self/clear_refs after ``malloc_trim``; indicative — the allocator keeps freed memory).

    python evaluation/benchmarks/mograd_step.py [--objectives 2,3] [--seq 32] [--rounds 5] \
        [--targets qkv|all] [--configs LS,STCH,MGDA,Gram-L2O,GML2O]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import statistics
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import get_peft_model

from align.adapters import PBLoraConfig, set_preference
from align.models import load_model
from align.mograd.engine import MultiObjectiveEngine

OBJECTIVE_NAMES = ["helpful", "harmless", "brief"]
#: ``--targets all``: every linear layer of the Llama blocks.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------------- memory
def _trim() -> None:
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> int | None:
    """Reset the peak-RSS counter; returns the current RSS (kB), or None off Linux."""
    _trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kb("VmRSS")


def peak_above(base: int | None) -> float | None:
    peak = _status_kb("VmHWM")
    if base is None or peak is None:
        return None
    return (peak - base) / 1024


# ---------------------------------------------------------------------------------- setup
def build_model(targets: str = "qkv", base=None, tokenizer=None):
    """PBLoRA (m = 3 objectives, α = 1/3 each, random factors) on ``base`` (default: the
    embedded model), in training mode."""
    if base is None:
        base, tokenizer = load_model("smollm2-135m-instruct")
    config = PBLoraConfig(
        objectives=OBJECTIVE_NAMES,
        lora_dropout=0.0,
        init_weights=False,
        target_modules=ALL_LINEAR if targets == "all" else None,
    )
    model = get_peft_model(base, config)
    set_preference(model, [1 / 3, 1 / 3, 1 / 3])
    model.train()
    return model, tokenizer


def batch_of(tokenizer, m: int, seq: int) -> torch.Tensor:
    """m rows of different text (the shipped prompts, concatenated), seq tokens each."""
    lines = resources.files("align").joinpath("resources/prompts.jsonl").read_text().splitlines()
    text = [json.loads(line)["prompt"] for line in lines if line.strip()]
    rows = []
    for i in range(m):
        ids = tokenizer(" ".join(text[i * 7 : i * 7 + 40]))["input_ids"][:seq]
        rows.append(ids)
    return torch.tensor(rows)


def forward(model, ids: torch.Tensor, hidden: bool = False):
    outputs = model(input_ids=ids, output_hidden_states=hidden, use_cache=False)
    logits = outputs.logits
    rows, width, vocab = logits.shape
    per_row = (
        F.cross_entropy(
            logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1), reduction="none"
        )
        .view(rows, width - 1)
        .mean(dim=1)
    )
    features = outputs.hidden_states[-1] if hidden else logits
    return per_row, features  # objective i: row i


class Timed:
    """Wraps an aggregator's ``weights`` (or an update-level one's ``compute_update``) to time
    the solver."""

    def __init__(self, engine: MultiObjectiveEngine) -> None:
        self.seconds: list[float] = []
        aggregator = engine.aggregator
        # Gradient-level: the weights from the Gram; update-level (GML2O): the whole update.
        attribute = "weights" if hasattr(aggregator, "weights") else "compute_update"
        if not hasattr(aggregator, attribute):
            return
        original = getattr(aggregator, attribute)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = original(*args, **kwargs)
            self.seconds.append(time.perf_counter() - start)
            return out

        setattr(aggregator, attribute, timed)


def configurations(model, params, m: int, only: set[str] | None = None):
    """name -> (step function, solver timer or None)."""
    preference = torch.full((m,), 1.0 / m)

    def engine_step(engine, hidden=False, features=False):
        def step(ids):
            losses, feats = forward(model, ids, hidden=hidden)
            loss = engine(losses, preference, features=feats if features else None)
            loss.backward()

        return step

    def floor(ids):
        losses, _ = forward(model, ids)
        for i in range(m):
            torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)

    def torchjd_step(chunk):
        from torchjd.aggregation import MGDA as TorchJDMGDA
        from torchjd.autojac import backward, jac_to_grad

        aggregator = TorchJDMGDA()

        def step(ids):
            losses, _ = forward(model, ids)
            backward(losses, inputs=params, parallel_chunk_size=chunk)
            jac_to_grad(params, aggregator)

        return step

    out = {}
    for name, method, options, hidden, features in [
        ("LS", "linear", {}, False, False),
        ("STCH", "stch", {}, False, False),
        ("MGDA", "mgda", {}, False, False),
        ("MGDA batched", "mgda", {"jacobian": "batched"}, False, False),
        ("PCGrad", "pcgrad", {}, False, False),
        ("Gram-L2O", "gram_l2o", {}, False, False),
        ("GML2O", "gml2o", {}, False, False),
        ("MGDA feature (h)", "mgda", {"feature_level": True}, True, True),
        ("MGDA feature (logits)", "mgda", {"feature_level": True}, False, True),
    ]:
        if only is not None and name not in only:
            continue
        engine = MultiObjectiveEngine(method, params, **options)
        timer = Timed(engine) if engine.is_gradient_level else None
        out[name] = (engine_step(engine, hidden, features), timer)
    for name, step in [
        ("torchjd MGDA", lambda: torchjd_step(None)),
        ("torchjd MGDA seq", lambda: torchjd_step(1)),
    ]:
        if only is None or name in only:
            out[name] = (step(), None)
    out["fwd + m bwd"] = (floor, None)  # always: the ratio column's reference
    return out


def run(model, tokenizer, m: int, seq: int, rounds: int, only: set[str] | None = None) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    ids = batch_of(tokenizer, m, seq)
    configs = configurations(model, params, m, only)
    times = {name: [] for name in configs}
    cpu_times = {name: [] for name in configs}
    memory = {name: [] for name in configs}

    def one(name):
        step, _ = configs[name]
        for p in params:
            p.grad = None
        base = reset_peak()
        start, cpu_start = time.perf_counter(), time.process_time()
        step(ids)
        cpu = time.process_time() - cpu_start
        elapsed = time.perf_counter() - start
        peak = peak_above(base)
        for p in params:
            p.grad = None
        return elapsed, cpu, peak

    for name in configs:  # warm-up (and the solver timers' first call)
        one(name)
    for config in configs.values():
        if config[1] is not None:
            config[1].seconds.clear()
    for _ in range(rounds):
        for name in configs:
            elapsed, cpu, peak = one(name)
            times[name].append(elapsed)
            cpu_times[name].append(cpu)
            if peak is not None:
                memory[name].append(peak)

    ls = statistics.median(cpu_times["LS"])
    floor = statistics.median(cpu_times["fwd + m bwd"])
    print(
        f"m = {m} objectives, {m} x {ids.shape[1]} tokens, SmolLM2-135M + PBLoRA "
        f"({sum(p.numel() for p in params):,} trainable), {rounds} rounds, "
        f"{torch.get_num_threads()} thread(s); ratios and solver share from CPU time"
    )
    header = (
        f"{'configuration':<24}{'cpu s':>8}{'wall s':>8}{'x LS':>7}{'x fwd+m bwd':>12}"
        f"{'solver ms':>10}{'solver %':>9}{'peak MB':>9}"
    )
    print(header)
    for name, (_, timer) in configs.items():
        median = statistics.median(cpu_times[name])
        wall = statistics.median(times[name])
        solver = statistics.median(timer.seconds) if timer and timer.seconds else None
        solver_ms = f"{solver * 1e3:10.2f}" if solver is not None else f"{'-':>10}"
        share = f"{100 * solver / median:8.3f}%" if solver is not None else f"{'-':>9}"
        peak = f"{statistics.median(memory[name]):9.0f}" if memory[name] else f"{'-':>9}"
        print(
            f"{name:<24}{median:8.3f}{wall:8.3f}{median / ls:7.2f}{median / floor:12.2f}"
            f"{solver_ms}{share}{peak}"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", default="2,3", help="comma-separated values of m")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: CPU time is the work done)"
    )
    parser.add_argument(
        "--targets", choices=("qkv", "all"), default="qkv", help="PBLoRA on q/k/v or all linear"
    )
    parser.add_argument(
        "--configs", help="comma-separated configuration names (default: all; LS always runs)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    only = None if not args.configs else {"LS", *args.configs.split(",")}
    model, tokenizer = build_model(args.targets)
    for m in (int(v) for v in args.objectives.split(",")):
        run(model, tokenizer, m, args.seq, args.rounds, only)


if __name__ == "__main__":
    main()
