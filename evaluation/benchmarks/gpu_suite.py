"""GPU suite: every accelerator path of align in one run, its figures in one table.

    python evaluation/benchmarks/gpu_suite.py --output gpu_suite.json   # one CUDA GPU, minutes
    python evaluation/benchmarks/gpu_suite.py --smoke                     # the same code, CPU, seconds

Rows (each prints what it measured; every timing is CUDA-synchronised, warm-up excluded):

* ``train.parm_vs_lora``: a bf16 PARMTrainer step (PBLoRA r1 = r2 = 4) against an ARMTrainer
  step with a LoRA of the same total rank (r = 8), same batch (``parm_step.py``'s building
  blocks), alternating, medians;
* ``train.parm_run_bf16`` / ``train.parm_run_qlora``: a short PARM run on fixed pairs whose
  loss must fall, on a bf16 base and on the same weights loaded as NF4 (bitsandbytes 4-bit,
  QLoRA style); step time and peak GPU memory side by side;
* ``mograd.*``: one training step through the multi-gradient engine with linear scalarization
  (LS, the baseline), MGDA and GML2O, and the floor of any exact gradient-level step (forward
  + m backward passes) (``mograd_step.py``'s configurations);
* ``decode.<shape>.b<B>``: greedy decoding throughput in bf16 of transformers ``generate``, of
  PARM-guided decoding with a shared base and of GenARM with m = 2 ARMs, at batch 1 / 8 / 32,
  as ratios to ``generate`` (``guided_decoding.py``'s timers), for the SmolLM2-135M, Llama 1B
  and Llama 8B shapes; a shape the GPU's free memory cannot hold is skipped with its figures.

Models are built from configs with random weights (step times and throughput need no trained
weights) and tokenized by align.testing's locally trained tokenizer, so nothing is downloaded;
the models keep their real vocabulary sizes (the LM head's cost), the prompts use the
tokenizer's 512 ids. A row whose package is missing prints ``skipped: X not installed``; a row
that fails prints its error and the suite goes on (exit status 1). ``--output`` writes the
table as JSON. ``--smoke`` runs every row's code on the CPU with tiny stand-in models (the
QLoRA row is skipped: NF4 kernels need CUDA); tests/test_gpu_suite.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts

import torch  # noqa: E402
from timing import timed  # noqa: E402

DTYPE = torch.bfloat16
OBJECTIVES = ["objective_0", "objective_1"]  # guided_decoding.make_parm's names for m = 2

#: Llama-family shapes (random weights): SmolLM2-135M (the embedded model's), Llama 3.2 1B,
#: Llama 3.1 8B.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}
#: --smoke: tiny stand-ins (align.testing's 2-layer, hidden-64 Llama, varied), same code paths.
SMOKE_SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {},
    "llama-1b": dict(
        hidden_size=96, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2
    ),
    "llama-8b": dict(num_hidden_layers=3, tie_word_embeddings=False),
}


# ------------------------------------------------------------------------------ the table
class Skipped(Exception):
    """A row that cannot run here; the message says why."""


class CheckFailed(Exception):
    """A row that ran but whose figures fail its check (e.g. a loss that does not fall)."""

    def __init__(self, message: str, figures: dict[str, Any]):
        super().__init__(message)
        self.figures = figures


@dataclass
class Row:
    id: str
    section: str
    measured: str  # what this row measured, in full (the section's settings included)
    status: str = "pending"  # ok | skipped | failed
    result: str = ""  # the figures in words, or why the row was skipped / failed
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None  # wall time of the row, from the end of the previous one
    what: str = ""  # the row's own part of ``measured`` (the table prints the rest once)


class Suite:
    """Runs rows one by one; a row that cannot run is skipped with its reason, a row that
    breaks is recorded as failed and the others still run. Rows belong to the section last
    opened; the section's settings are printed once above its rows."""

    def __init__(self, budget_s: float | None = None) -> None:
        self.rows: list[Row] = []
        self.sections: dict[str, str] = {}
        self.current = ""
        self.started = self.last = time.perf_counter()
        self.budget_s = budget_s

    def budget_spent(self) -> str | None:
        """Why no more work should start (the run must end with its table), or None."""
        if self.budget_s is None or time.perf_counter() - self.started < self.budget_s:
            return None
        return f"the suite's time budget ({self.budget_s:.0f} s, --budget-s) is spent"

    def section(self, name: str, settings: str) -> None:
        self.current = name
        self.sections[name] = settings
        print(f"== {name}: {settings}", flush=True)

    def run(
        self,
        row_id: str,
        what: str,
        work: Callable[[], tuple[str, dict[str, Any]]],
        needs: tuple[str, ...] = (),
    ) -> Row:
        row = Row(row_id, self.current, f"{what}; {self.sections[self.current]}", what=what)
        try:
            missing = [name for name in needs if importlib.util.find_spec(name) is None]
            if missing:
                raise Skipped(f"{', '.join(missing)} not installed")
            row.result, row.figures = work()
            row.status = "ok"
        except Skipped as reason:
            row.status, row.result = "skipped", str(reason)
        except ModuleNotFoundError as error:
            row.status, row.result = "skipped", f"{error.name} not installed"
        except torch.cuda.OutOfMemoryError as error:
            row.status = "skipped"
            row.result = f"out of GPU memory: {str(error).splitlines()[0]}"
        except CheckFailed as failure:
            row.status, row.result, row.figures = "failed", str(failure), failure.figures
        except Exception as error:  # the suite goes on: one broken path must not hide the rest
            traceback.print_exc()
            row.status, row.result = "failed", f"{type(error).__name__}: {error}"
        now = time.perf_counter()
        row.seconds, self.last = round(now - self.last, 2), now
        self.rows.append(row)
        print(f"[{now - self.started:6.0f} s] {row.status:<8}{row.id:<26}{row.result}", flush=True)
        release()
        return row

    def skip(self, row_id: str, what: str, reason: str) -> Row:
        def work():
            raise Skipped(reason)

        return self.run(row_id, what, work)

    def table(self) -> str:
        lines = []
        for name, settings in self.sections.items():
            lines.append(f"{name}: {settings}")
            for row in (r for r in self.rows if r.section == name):
                lines.append(f"  {row.id:<25}{row.status:<8} {row.result}")
                lines.append(f"  {'':<33} ({row.what})")
        counts = {s: sum(r.status == s for r in self.rows) for s in ("ok", "skipped", "failed")}
        lines.append("rows: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        return "\n".join(lines)


def release() -> None:
    """Give the GPU memory of dropped models back (a full gc pass: about a second on a loaded
    CPU, so only where CUDA is in use)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


def memory_shortfall(need_bytes: int, free_bytes: int | None) -> str | None:
    """Why ``need_bytes`` cannot be placed in ``free_bytes`` (None: no limit known), or None."""
    if free_bytes is None or need_bytes <= free_bytes:
        return None
    return f"needs about {need_bytes / 2**30:.1f} GiB, {free_bytes / 2**30:.1f} GiB free"


def free_memory(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    release()
    return torch.cuda.mem_get_info(device)[0]


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        release()
        torch.cuda.reset_peak_memory_stats(device)


# ------------------------------------------------------------------------------- models
@dataclass
class Context:
    device: torch.device
    smoke: bool
    tokenizer: Any
    suite: Suite
    args: argparse.Namespace

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"


def shape_config(shape: str, tokenizer: Any):
    from transformers import LlamaConfig

    config = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def parameter_count(shape: str, tokenizer: Any) -> int:
    """Parameters of a shape, counted on the meta device (nothing allocated)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(shape_config(shape, tokenizer))
    return sum(p.numel() for p in model.parameters())


def random_model(ctx: Context, shape: str, seed: int = 0):
    """A Llama of ``shape`` with random weights, in bf16 on the device (built there: an 8B
    model is initialised by the GPU in seconds, not by the CPU in minutes)."""
    if ctx.smoke:
        from align.testing import tiny_causal_lm

        model, _ = tiny_causal_lm(ctx.tokenizer, seed=seed, **SMOKE_SHAPES[shape])
        return model.to(device=ctx.device, dtype=DTYPE).eval()
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with ctx.device:
            model = LlamaForCausalLM(shape_config(shape, ctx.tokenizer))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def shape_label(ctx: Context, shape: str) -> str:
    return f"tiny stand-in for {shape}" if ctx.smoke else f"{shape} shape, random weights"


# ----------------------------------------------------------------------------- training
def training_section(ctx: Context) -> None:
    args = ctx.args
    ctx.suite.section(
        "training",
        f"{shape_label(ctx, args.train_shape)}; bf16 base, bf16 autocast; batches of "
        f"{args.pairs} preference pairs (shipped prompts, answers of ~{args.response_tokens} "
        f"tokens); a step is TRL's training_step (forward, losses, backward) and AdamW",
    )
    what = {
        "train.parm_vs_lora": (
            f"PARMTrainer step, PBLoRA r1=r2=4 on q/k/v, vs ARMTrainer step, LoRA r=8 on q/k/v, "
            f"same batch; medians of {args.repeats} alternating steps after {args.warmup} "
            f"warm-up steps each"
        ),
        "train.parm_run_bf16": (
            f"a PARM run of {args.run_steps} steps on one fixed batch, both objectives preferring "
            f"the first answer (PBLoRA on every linear layer, β 0.1, lr 2e-3): losses of the "
            f"first and last steps, must fall by 5%; median s/step after the first 2; peak GPU "
            f"memory"
        ),
        "train.parm_run_qlora": (
            "the same run on the same weights loaded as NF4 (bitsandbytes 4-bit, double "
            "quantization, bf16 compute, prepare_model_for_kbit_training); loss must fall; "
            "s/step and peak memory against the bf16 run"
        ),
    }
    missing = [name for name in ("trl", "datasets") if importlib.util.find_spec(name) is None]
    reason = f"{missing[0]} not installed" if missing else ctx.suite.budget_spent()
    if reason:
        for row_id, text in what.items():
            ctx.suite.skip(row_id, text, reason)
        return
    with tempfile.TemporaryDirectory(prefix="align-gpu-suite-") as folder:
        model = random_model(ctx, args.train_shape)  # one checkpoint: the same weights for all
        model.save_pretrained(folder)
        ctx.tokenizer.save_pretrained(folder)
        del model
        release()

        ctx.suite.run(
            "train.parm_vs_lora", what["train.parm_vs_lora"], lambda: parm_vs_lora(ctx, folder)
        )
        bf16 = ctx.suite.run(
            "train.parm_run_bf16", what["train.parm_run_bf16"], lambda: parm_run(ctx, folder)
        )

        def qlora():
            if not ctx.on_cuda:
                raise Skipped("NF4 QLoRA needs a CUDA GPU (bitsandbytes 4-bit kernels); CPU run")
            return parm_run(ctx, folder, quantized=True, baseline=bf16)

        ctx.suite.run(
            "train.parm_run_qlora", what["train.parm_run_qlora"], qlora, needs=("bitsandbytes",)
        )


def parm_vs_lora(ctx: Context, folder: str):
    import parm_step

    from align.models import load_model

    args = ctx.args
    model, tokenizer = load_model(folder, dtype=DTYPE, device=ctx.device)
    pairs = parm_step.make_pairs(tokenizer, args.pairs, args.response_tokens)
    options = parm_step.trainer_options(args.pairs, str(ctx.device), bf16=True)
    trainers = parm_step.parm_and_arm(model, tokenizer, pairs, **options)
    del model
    for trainer, batch in trainers.values():
        for _ in range(args.warmup):
            parm_step.step_time(trainer, batch, ctx.device)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(args.repeats):
        for name, (trainer, batch) in trainers.items():
            times[name].append(parm_step.step_time(trainer, batch, ctx.device))
    parm_s, lora_s = (statistics.median(times[name]) for name in ("PARM", "ARM"))
    batch = trainers["PARM"][1]
    figures = dict(
        parm_step_s=parm_s,
        lora_step_s=lora_s,
        ratio=parm_s / lora_s,
        tokens=int(batch["attention_mask"].sum()),
        pairs=args.pairs,
        trainable_parm=trainable(trainers["PARM"][0].model),
        trainable_lora=trainable(trainers["ARM"][0].model),
        parm_steps_s=times["PARM"],
        lora_steps_s=times["ARM"],
    )
    result = (
        f"PARM {parm_s * 1e3:.1f} ms vs LoRA {lora_s * 1e3:.1f} ms per step "
        f"({figures['tokens']} tokens): {parm_s / lora_s:.2f}×"
    )
    return result, figures


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parm_run(ctx: Context, folder: str, quantized: bool = False, baseline: Row | None = None):
    """A PARM run whose loss must fall (the mean of the last 3 steps' below 0.95 × the first
    3 steps'), on an NF4 base if ``quantized``; ``baseline``: the bf16 run, for ratios."""
    import mograd_step
    import parm_step

    from align.models import load_model
    from align.trainers import PARMConfig, PARMTrainer

    args = ctx.args
    reset_peak_memory(ctx.device)
    if not quantized:
        model, tokenizer = load_model(folder, dtype=DTYPE, device=ctx.device)
    else:
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPE,
        )
        model, tokenizer = load_model(
            folder, dtype=DTYPE, device=ctx.device, quantization_config=quantization
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    pairs = parm_step.make_pairs(tokenizer, args.pairs, args.response_tokens, learnable=True)
    config = PARMConfig(
        **parm_step.trainer_options(args.pairs, str(ctx.device), bf16=True),
        beta=0.1,
        learning_rate=2e-3,
        lora_dropout=0.0,
        target_modules=mograd_step.ALL_LINEAR,  # q/k/v alone barely move a random model's loss
    )
    trainer = PARMTrainer(model, config, pairs, processing_class=tokenizer)
    batch = parm_step.prepare(trainer)
    losses, times = [], []
    for _ in range(args.run_steps):
        seconds, loss = timed(lambda: parm_step.optimizer_step(trainer, batch), ctx.device)
        losses.append(float(loss))
        times.append(seconds)
    step_s = statistics.median(times[2:] or times)
    head, tail = losses[:3], losses[-3:]
    falls = statistics.mean(tail) < 0.95 * statistics.mean(head)
    peak = peak_memory_gib(ctx.device)
    figures = dict(
        losses=losses,
        loss_first=losses[0],
        loss_last=losses[-1],
        loss_falls=falls,
        step_s=step_s,
        peak_memory_gib=peak,
        trainable=trainable(trainer.model),
    )
    result = (
        f"loss {losses[0]:.4f} → {losses[-1]:.4f} in {len(losses)} steps, "
        f"{step_s * 1e3:.1f} ms/step" + (f", peak {peak:.2f} GiB" if peak is not None else "")
    )
    if baseline is not None and baseline.status == "ok":
        ratio = step_s / baseline.figures["step_s"]
        figures["step_ratio_to_bf16"] = ratio
        result += f"; {ratio:.2f}× the bf16 run's step"
        if peak is not None and baseline.figures.get("peak_memory_gib"):
            figures["memory_ratio_to_bf16"] = peak / baseline.figures["peak_memory_gib"]
            result += f", {figures['memory_ratio_to_bf16']:.2f}× its memory"
    if not falls:
        raise CheckFailed(f"loss does not fall: {result}", figures)
    return result, figures


# ------------------------------------------------------------------------ multi-gradient
MOGRAD_ROWS = {"LS": "mograd.ls", "MGDA": "mograd.mgda", "GML2O": "mograd.gml2o"}
FLOOR = "fwd + m bwd"


def mograd_section(ctx: Context) -> None:
    import mograd_step

    args = ctx.args
    m = 2
    ctx.suite.section(
        "mograd",
        f"{shape_label(ctx, args.train_shape)}, bf16, PBLoRA on q/k/v; m = {m} losses (one "
        f"row of {args.mograd_seq} tokens each); a step is forward, losses, "
        f"MultiObjectiveEngine, backward (no optimizer step); medians of {args.repeats} "
        f"interleaved rounds after a warm-up",
    )
    what = {
        "LS": "linear scalarization: one backward (the baseline)",
        "MGDA": "MGDA: m backward passes, min-norm weights, the update injected",
        "GML2O": "GML2O: the learned coordinate-wise update, guarded by MGDA",
        FLOOR: "forward + m autograd.grad passes only: the floor of an exact gradient-level step",
    }
    ids = {**MOGRAD_ROWS, FLOOR: "mograd.fwd_m_bwd"}
    reason = ctx.suite.budget_spent()
    if reason:
        for name, row_id in ids.items():
            ctx.suite.skip(row_id, what[name], reason)
        return
    try:
        base = random_model(ctx, args.train_shape)
        model, _ = mograd_step.build_model("qkv", base=base, tokenizer=ctx.tokenizer)
        params = [p for p in model.parameters() if p.requires_grad]
        batch = mograd_step.batch_of(ctx.tokenizer, m, args.mograd_seq).to(ctx.device)
        configs = mograd_step.configurations(model, params, m, only=set(MOGRAD_ROWS))
    except Exception as error:  # every row of the section reports the one cause
        traceback.print_exc()
        for name, row_id in ids.items():
            ctx.suite.skip(row_id, what[name], f"setup failed: {type(error).__name__}: {error}")
        return

    def one(name: str) -> float:
        for p in params:
            p.grad = None
        seconds, _ = timed(lambda: configs[name][0](batch), ctx.device)
        return seconds

    times: dict[str, list[float]] = {name: [] for name in configs}
    errors: dict[str, Exception] = {}
    for name in configs:  # warm-up
        try:
            one(name)
        except Exception as error:
            traceback.print_exc()
            errors[name] = error
    for _ in range(args.repeats):
        for name in configs:
            if name not in errors:
                times[name].append(one(name))
    medians = {name: statistics.median(t) for name, t in times.items() if t}
    size = sum(p.numel() for p in params)

    def report(name: str):
        if name in errors:
            raise errors[name]
        seconds = medians[name]
        figures = dict(step_s=seconds, steps_s=times[name], trainable=size)
        result = f"{seconds * 1e3:.1f} ms/step"
        if "LS" in medians and name != "LS":
            figures["ratio_to_ls"] = seconds / medians["LS"]
            result += f", {figures['ratio_to_ls']:.2f}× LS"
        if FLOOR in medians and name not in ("LS", FLOOR):
            figures["ratio_to_floor"] = seconds / medians[FLOOR]
            result += f", {figures['ratio_to_floor']:.2f}× fwd + m bwd"
        return result, figures

    for name, row_id in ids.items():
        ctx.suite.run(row_id, what[name], lambda name=name: report(name))


# ----------------------------------------------------------------------------- decoding
def decoding_section(ctx: Context) -> None:
    from align.data import load_prompts

    args = ctx.args
    warmup = f"a {args.warmup_tokens}-token warm-up" if args.warmup_tokens else "no warm-up"
    ctx.suite.section(
        "decoding",
        f"bf16, greedy, {args.new_tokens} new tokens per prompt (EOS ignored), the batch in "
        f"the row's name, after {warmup} at that batch; tokens/s "
        f"of transformers generate, of PARM-guided decoding with a shared base (base + PBLoRA "
        f"on the same weights: one batched forward per step) and of GenARM with m = 2 ARMs of "
        f"the base's shape (one set of weights, a KV cache each: three forwards per step); "
        f"ratios to generate",
    )
    prompts = [r["prompt"] for r in load_prompts(limit=max(args.batch_sizes))]
    for shape in args.shapes:
        decode_shape(ctx, shape, prompts)
        release()  # the shape's models, before the next one is built


def decode_shape(ctx: Context, shape: str, prompts: list[str]) -> None:
    import guided_decoding

    from align.decoding import genarm_guidance, parm_guidance

    args = ctx.args
    tokens = args.new_tokens
    label = shape_label(ctx, shape)

    def what(batch: int) -> str:
        return f"{label}, batch {batch}"

    ids = {b: f"decode.{shape}.b{b}" for b in args.batch_sizes}
    reason = ctx.suite.budget_spent()
    if reason:
        for b, row_id in ids.items():
            ctx.suite.skip(row_id, what(b), reason)
        return
    if not ctx.smoke:
        parameters = parameter_count(shape, ctx.tokenizer)
        # bf16 weights (one set: base, PARM and ARMs share it), KV caches and activations.
        need = int(parameters * 2 * 1.25) + 4 * 2**30
        short = memory_shortfall(need, free_memory(ctx.device))
        if short is not None:
            for b, row_id in ids.items():
                ctx.suite.skip(row_id, what(b), f"{shape} ({parameters / 1e9:.1f} B): {short}")
            return
    try:
        model = random_model(ctx, shape)
    except Exception as error:
        traceback.print_exc()
        reason = f"building the {shape} model failed: {type(error).__name__}: {error}"
        for b, row_id in ids.items():
            ctx.suite.skip(row_id, what(b), reason)
        return
    vocab = model.config.vocab_size  # score the model's whole vocabulary, as a real one would
    size = sum(p.numel() for p in model.parameters())
    rates: dict[int, dict[str, float]] = {b: {} for b in args.batch_sizes}
    errors: dict[int, dict[str, str]] = {b: {} for b in args.batch_sizes}

    def measure(method: str, batch: int, rate: Callable[[int], float]) -> None:
        try:
            if args.warmup_tokens:  # the first call at a batch size pays for kernel choices
                rate(args.warmup_tokens)
            rates[batch][method] = rate(tokens)
            print(f"  {shape} batch {batch} {method}: {rates[batch][method]:.0f} tok/s", flush=True)
        except torch.cuda.OutOfMemoryError as error:
            errors[batch][method] = f"out of GPU memory: {str(error).splitlines()[0]}"
        except Exception as error:
            traceback.print_exc()
            errors[batch][method] = f"{type(error).__name__}: {error}"

    arms = genarm_guidance({name: model for name in OBJECTIVES})
    alpha = [0.5, 0.5]
    for b in args.batch_sizes:  # the bare model first: generate and GenARM
        batch = prompts[:b]
        measure(
            "generate",
            b,
            lambda n, batch=batch: guided_decoding.timed_base(
                model, ctx.tokenizer, batch, n, ctx.device
            ),
        )
        measure(
            "genarm",
            b,
            lambda n, batch=batch: guided_decoding.timed_guided(
                model, ctx.tokenizer, arms, batch, alpha, n, ctx.device, vocab
            ),
        )
    parm = None
    try:  # then the PBLoRA adapter on the same weights: the shared-base PARM
        parm, _ = guided_decoding.make_parm(len(OBJECTIVES), model)
        guidance = parm_guidance(parm)
        base = parm.get_base_model()
        for b in args.batch_sizes:
            batch = prompts[:b]
            measure(
                "parm",
                b,
                lambda n, batch=batch: guided_decoding.timed_guided(
                    base, ctx.tokenizer, guidance, batch, alpha, n, ctx.device, vocab
                ),
            )
    except Exception as error:
        traceback.print_exc()
        for b in args.batch_sizes:
            errors[b]["parm"] = f"{type(error).__name__}: {error}"

    def report(b: int):
        measured_rates = rates[b]
        figures: dict[str, Any] = {f"{k}_tokens_per_s": v for k, v in measured_rates.items()}
        figures.update(batch=b, new_tokens=tokens, vocab_size=vocab, parameters=size)
        parts = []
        generate = measured_rates.get("generate")
        if generate is not None:
            parts.append(f"generate {generate:.0f} tok/s")
        for method, name in (("parm", "PARM shared base"), ("genarm", "GenARM m=2")):
            if method in measured_rates:
                text = f"{name} {measured_rates[method]:.0f} tok/s"
                if generate:
                    figures[f"{method}_ratio"] = measured_rates[method] / generate
                    text += f" ({figures[f'{method}_ratio']:.2f}×)"
                parts.append(text)
        result = "; ".join(parts)
        if errors[b]:
            problems = "; ".join(f"{k}: {v}" for k, v in errors[b].items())
            raise CheckFailed(f"{problems} | {result}", figures)
        return result, figures

    for b, row_id in ids.items():
        ctx.suite.run(row_id, what(b), lambda b=b: report(b))


# --------------------------------------------------------------------------------- main
PACKAGES = (
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "bitsandbytes",
    "deepspeed",
    "moocore",
)


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    for name in PACKAGES:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    return info


def quiet_progress_bars() -> None:
    """No per-call progress bars (tokenizing pairs, loading weights): the table stays readable
    in the device tool's output tail."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, seconds")
    parser.add_argument("--output", help="write the table as JSON here")
    parser.add_argument("--device", help="default: cuda (--smoke: cpu)")
    parser.add_argument("--sections", nargs="+", default=["training", "mograd", "decoding"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--train-shape", default="llama-1b", choices=list(SHAPES))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, help="default 128 (--smoke: 2)")
    parser.add_argument("--warmup-tokens", type=int, default=8)
    parser.add_argument("--pairs", type=int, help="pairs per batch, default 8 (--smoke: 2)")
    parser.add_argument("--response-tokens", type=int, help="default 96 (--smoke: 16)")
    parser.add_argument("--repeats", type=int, help="timed repeats, default 5 (--smoke: 2)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up training steps")
    parser.add_argument("--run-steps", type=int, help="PARM run length, default 30 (--smoke: 8)")
    parser.add_argument("--mograd-seq", type=int, help="default 256 (--smoke: 16)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=390.0,
        help="start no section or decoding shape after this many seconds: their rows are "
        "skipped, so the run ends with its table inside the device tool's limits",
    )
    args = parser.parse_args(argv)
    defaults = dict(new_tokens=128, pairs=8, response_tokens=96, repeats=5, run_steps=30)
    defaults["mograd_seq"] = 256
    smoke = dict(new_tokens=2, pairs=2, response_tokens=16, repeats=2, run_steps=8)
    smoke["mograd_seq"] = 16
    for name, value in (smoke if args.smoke else defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.smoke:  # seconds: no warm-ups (they run the timed code once more)
        args.warmup = args.warmup_tokens = 0
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU here; --smoke runs the same code on the CPU", file=sys.stderr)
        return 2
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors: one thread is the fastest on a shared machine
    started = time.perf_counter()
    quiet_progress_bars()
    from align.testing import tiny_tokenizer

    env = environment(device)
    print(
        "align GPU suite"
        + (" (smoke: tiny models on the CPU)" if args.smoke else "")
        + ": "
        + ", ".join(f"{k} {v}" for k, v in env.items()),
        flush=True,
    )
    ctx = Context(device, args.smoke, tiny_tokenizer(), Suite(args.budget_s), args)
    sections = {"training": training_section, "mograd": mograd_section}
    sections["decoding"] = decoding_section
    for name in args.sections:
        if name not in sections:
            print(f"error: unknown section {name!r}; known: {sorted(sections)}", file=sys.stderr)
            return 2
    for name in args.sections:
        sections[name](ctx)
    seconds = time.perf_counter() - started
    print()
    print(ctx.suite.table())
    print(f"total {seconds:.0f} s")
    if args.output:
        report = dict(
            suite="align gpu_suite",
            smoke=args.smoke,
            environment=env,
            settings={k: v for k, v in vars(args).items() if k != "output"},
            seconds=round(seconds, 1),
            rows=[asdict(row) for row in ctx.suite.rows],
        )
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"table written to {path}")
    return 1 if any(row.status == "failed" for row in ctx.suite.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
