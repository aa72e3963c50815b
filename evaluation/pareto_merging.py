"""Pareto merging vs task arithmetic (and TIES) on two fine-tuned copies of SmolLM2-135M.

Inputs: the embedded SmolLM2-135M-Instruct (the base) and two copies of it, each briefly fully
fine-tuned (``--finetune-steps`` AdamW steps, lr 2e-5, batch 4) on its own text: "enthusiastic"
answers (objective ``positive``) and one-line answers (objective ``brief``) to the shipped
prompts. They are built once and cached under ``$ALIGN_CACHE/merging/`` (see
:func:`derived_checkpoints`; the merging benchmark uses the same folders).

For each method the 11-point α grid gives 11 merged models; the data-free objectives are the
distances of θ(α) to each fine-tuned model, ‖θ(α) − θ_k‖, in units of ‖θ_positive − θ_brief‖.
Lower is better on both; hypervolume (moocore) is taken against the reference point
(1.1, 1.1). Task arithmetic and TIES need all models at merge time; Pareto merging needs only its
artifact (base merge + rank-r factors), from which each α is materialised in seconds.

    python evaluation/pareto_merging.py [--rank 8] [--steps 500] [--entropy-steps 0]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from align.io import atomic_directory
from align.merging import ParetoArtifact, get_merge_method, open_inputs, pareto_merge
from align.merging.checkpoint_io import copy_side_files, read_stack
from align.metrics import hypervolume, pareto_mask
from align.models import cache_root, embedded_model_path
from align.preference import simplex_grid

OBJECTIVES = ("positive", "brief")
REFERENCE = (1.1, 1.1)


def _texts(objective: str, tokenizer, count: int) -> list[str]:
    from align.data import load_prompts

    prompts = [row["prompt"] for row in load_prompts(limit=count)]
    if objective == "positive":
        answers = [
            "What a wonderful question! I love it. Here is a happy, detailed answer with lots of "
            "great ideas, and I am sure you will do brilliantly."
        ] * len(prompts)
    else:
        answers = ["Short answer: yes.", "In brief: it depends.", "No.", "Yes, briefly."] * (
            len(prompts) // 4 + 1
        )
    chats = [
        [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
        for p, a in zip(prompts, answers)
    ]
    return [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]


def _finetune(objective: str, steps: int, seed: int, target: Path) -> None:
    from align.models import load_model

    torch.manual_seed(seed)
    model, tokenizer = load_model()
    model.train()
    texts = _texts(objective, tokenizer, 4 * steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
    for step in range(steps):
        batch = tokenizer(
            texts[4 * step : 4 * step + 4],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=96,
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(
            f"  fine-tuning {objective}: step {step + 1}/{steps} loss {loss.item():.3f}", flush=True
        )
    model.eval()
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        copy_side_files(
            embedded_model_path(),
            tmp,
            names=(
                "tokenizer.json",
                "tokenizer_config.json",
                "chat_template.jinja",
                "special_tokens_map.json",
                "generation_config.json",
            ),
        )


def derived_checkpoints(steps: int = 8) -> dict[str, Path]:
    """The base and two briefly fine-tuned copies of SmolLM2-135M (built once, cached)."""
    root = cache_root() / "merging" / f"smollm2-finetuned-{steps}steps"
    folders = {"base": embedded_model_path()}
    for seed, objective in enumerate(OBJECTIVES):
        target = root / objective
        if not (target / "config.json").is_file():
            print(f"building the {objective!r} copy of SmolLM2 in {target}", flush=True)
            _finetune(objective, steps, seed, target)
        folders[objective] = target
    return folders


def method_front(inputs, method, alphas: torch.Tensor) -> np.ndarray:
    """Squared distances D_k(α) of a registered merge to each model, one tensor at a time."""
    distances = np.zeros((len(alphas), len(inputs.models)))
    for name in inputs.models[0].names:
        stacked = read_stack(inputs.models, name, torch.float32)
        base = inputs.base.get_tensor(name).float() if method.needs_base else None
        prepared = method.prepare(name, stacked, base)
        for row, alpha in enumerate(alphas):
            merged = method.apply(prepared, alpha.float())
            distances[row] += (merged[None] - stacked).double().pow(2).flatten(1).sum(1).numpy()
    return distances


def artifact_front(artifact: ParetoArtifact, inputs, alphas: torch.Tensor) -> np.ndarray:
    """Measured D_k(α) of the materialised θ(α) (not the artifact's closed form)."""
    distances = np.zeros((len(alphas), len(inputs.models)))
    prefs = [artifact.preference(a) for a in alphas]
    for name in artifact.base.names:
        if not artifact.base.tensors[name].dtype.is_floating_point:
            continue
        stacked = read_stack(inputs.models, name, torch.float32)
        base = None if name in artifact.small else artifact.base.get_tensor(name)
        for row, alpha in enumerate(prefs):
            value = artifact.tensor(name, alpha, base).float()
            distances[row] += (value[None] - stacked).double().pow(2).flatten(1).sum(1).numpy()
    return distances


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=500, help="Pareto-merging training steps")
    parser.add_argument("--finetune-steps", type=int, default=8)
    parser.add_argument(
        "--entropy-steps",
        type=int,
        default=0,
        help="also train a data-based (entropy) artifact for this many steps",
    )
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    # One thread: on a shared 2-core machine, OpenMP's spin-waits make two threads far slower.
    torch.set_num_threads(args.threads)

    folders = derived_checkpoints(args.finetune_steps)
    inputs = open_inputs({o: folders[o] for o in OBJECTIVES}, folders["base"])
    alphas = simplex_grid(2, 10)
    gap = math.sqrt(
        method_front(inputs, get_merge_method("linear"), torch.tensor([[1.0, 0.0]]))[0, 1]
    )
    print(f"‖θ_positive − θ_brief‖ = {gap:.4f} (the distance unit)")

    rows = []

    def record(label, squared, extra):
        front = np.sqrt(np.maximum(squared, 0)) / gap
        rows.append(
            {
                "method": label,
                "hv": hypervolume(front, REFERENCE, maximize=False),
                "on_front": int(pareto_mask(front, maximize=False).sum()),
                "d_positive@(1,0)": float(front[-1, 0]),
                "d_brief@(0,1)": float(front[0, 1]),
                "d@(.5,.5)": float(front[5].mean()),
                **extra,
            }
        )

    model_bytes = sum(info.nbytes for info in inputs.models[0].tensors.values())
    needs_all = {
        "needs at merge time": f"{len(inputs.all_checkpoints())} models ({len(inputs.all_checkpoints()) * model_bytes / 1e6:.0f} MB)"
    }
    for label, name, params in (
        ("task arithmetic λ=1 (= linear)", "task_arithmetic", {}),
        ("task arithmetic λ=0.7", "task_arithmetic", {"lambda": 0.7}),
        ("TIES density 0.5", "ties", {"density": 0.5}),
    ):
        started = time.perf_counter()
        squared = method_front(inputs, get_merge_method(name, **params), alphas)
        record(label, squared, {**needs_all, "seconds": round(time.perf_counter() - started, 1)})
        print(f"  {label}: HV {rows[-1]['hv']:.4f} ({rows[-1]['seconds']} s)", flush=True)

    work = Path(tempfile.mkdtemp(prefix="pareto-merging-"))
    try:
        variants = [
            ("Pareto merging, linear (TA base)", {"scalarization": "linear"}),
            ("Pareto merging, STCH (TA base)", {"scalarization": "smooth_tchebycheff"}),
            (
                "Pareto merging, STCH (TIES base)",
                {
                    "scalarization": "smooth_tchebycheff",
                    "base_method": "ties",
                    "base_parameters": {"density": 0.5},
                },
            ),
        ]
        if args.entropy_steps:
            from align.data import load_prompts

            prompts = [row["prompt"] for row in load_prompts(limit=8)]
            variants.append(
                (
                    f"Pareto merging, linear + entropy ({args.entropy_steps} steps)",
                    {
                        "scalarization": "linear",
                        "entropy_weight": 0.1,
                        "prompts": prompts,
                        "steps": args.entropy_steps,
                        "entropy_max_length": 32,
                    },
                )
            )
        for label, options in variants:
            options = {"rank": args.rank, "steps": args.steps, **options}
            started = time.perf_counter()
            artifact = pareto_merge(inputs, work / label.replace(" ", "_"), options=options)
            built = time.perf_counter() - started
            started = time.perf_counter()
            artifact.materialize([0.3, 0.7], work / "materialised")
            materialise = time.perf_counter() - started
            shutil.rmtree(work / "materialised")
            squared = artifact_front(artifact, inputs, alphas)
            closed = artifact.objective_values(alphas).numpy()
            assert np.allclose(closed, squared, rtol=1e-3, atol=1e-6 * squared.max()), (
                closed,
                squared,
            )
            sizes = artifact.size_bytes()
            record(
                label,
                squared,
                {
                    "needs at merge time": f"artifact ({(sizes['base'] + sizes['factors']) / 1e6:.0f} MB, factors {sizes['factors'] / 1e6:.1f} MB)",
                    "seconds": round(built, 1),
                    "materialise s": round(materialise, 1),
                },
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    header = f"{'method':<44}{'HV':>8}{'front':>7}{'d_pos@(1,0)':>12}{'d_brief@(0,1)':>14}{'d@(.5,.5)':>10}{'build s':>9}{'α→ckpt s':>10}  needs at merge time"
    print(header)
    for row in rows:
        print(
            f"{row['method']:<44}{row['hv']:>8.4f}{row['on_front']:>7}{row['d_positive@(1,0)']:>12.4f}"
            f"{row['d_brief@(0,1)']:>14.4f}{row['d@(.5,.5)']:>10.4f}{row['seconds']:>9.1f}"
            f"{row.get('materialise s', float('nan')):>10.1f}  {row['needs at merge time']}"
        )
    ta = rows[0]["hv"]
    for row in rows[3:]:
        print(f"{row['method']}: HV {row['hv'] / ta:.3f}x task arithmetic (λ=1)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
