"""What one α-conditioned RL policy buys against one RL run per α, on the demo's sweep.

    python evaluation/mo_grpo_front.py --out runs/mo-grpo-front            # train + sweep
    python evaluation/mo_grpo_front.py --out runs/mo-grpo-front --demo demo  # + PARM, GenARM

Trains, with ``recipes/mo_grpo_cpu.yaml`` on the embedded SmolLM2 (rewards: positivity and
brevity):

* **conditioned**: one PBLoRA policy, α ~ Dirichlet(1) per prompt group, ``--steps`` steps;
* **per α**: three LoRA policies at the fixed α = (1, 0), (0.5, 0.5), (0, 1), ``--steps / 3``
  steps each — the same number of generated completions in all.

Then sweeps them on the demo's held-out prompts with the demo's settings
(``recipes/evaluate/positive_brief.yaml``: the last 30 shipped prompts, 11 α, greedy, 48 new
tokens, positivity and brevity on their fixed scales): the conditioned policy at every α, the
three runs at their own α, the untuned base, and — with ``--demo DIR`` (an ``align demo``
folder) — the demo's decoding-time routes (PARM, GenARM) on the same prompts and budget. The
report (HV, MIP, Spearman ρ, dominance of the base) lands in ``OUT/evaluate``. Training runs
whose final adapter exists are not redone; the sweep caches generations by content.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "mo_grpo_cpu.yaml"
SWEEP = REPO / "recipes" / "evaluate" / "positive_brief.yaml"
FIXED = {"a10": [1.0, 0.0], "a55": [0.5, 0.5], "a01": [0.0, 1.0]}


def train(out: Path, name: str, steps: int, seed: int, *overrides: str) -> float:
    """Train one run (skipped when its final adapter exists); its wall time in seconds."""
    folder = out / name
    if (folder / "final" / "adapter_config.json").is_file():
        print(f"{name}: trained already ({folder / 'final'})")
        return 0.0
    command = [sys.executable, "-m", "align.train", str(RECIPE)]
    for item in (
        f"args.output_dir={folder}",
        f"args.max_steps={steps}",
        f"args.seed={seed}",
        *overrides,
    ):
        command += ["--set", item]
    print(f"{name}: {' '.join(command[3:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def main(
    out: Annotated[Path, typer.Option(help="Folder for the runs and the sweep.")] = Path(
        "runs/mo-grpo-front"
    ),
    steps: Annotated[int, typer.Option(help="Steps of the conditioned policy.")] = 120,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    demo: Annotated[
        Path | None, typer.Option(help="An `align demo` folder: add its PARM and GenARM.")
    ] = None,
    sweep_only: Annotated[bool, typer.Option(help="Skip training (runs must exist).")] = False,
) -> None:
    if steps % 3:
        raise typer.BadParameter("--steps must be a multiple of 3 (three runs share it)")
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    if not sweep_only:
        times["conditioned"] = train(out, "conditioned", steps, seed)
        for name, alpha in FIXED.items():
            times[name] = train(
                out,
                name,
                steps // 3,
                seed,
                f"args.preference=[{alpha[0]},{alpha[1]}]",
                "args.policy_adapter=lora",
            )
    config = yaml.safe_load(SWEEP.read_text())
    routes = [
        {"name": "base", "kind": "base"},
        {"name": "MO-GRPO policy", "kind": "policy", "adapter": str(out / "conditioned/final")},
        {
            "name": "MO-GRPO per α",
            "kind": "merged",
            "checkpoints": [str(out / name / "final") for name in FIXED],
        },
    ]
    if demo is not None:
        routes += [
            {"name": "PARM", "kind": "parm", "adapter": str(demo / "parm/final"), "beta": 0.75},
            {
                "name": "GenARM",
                "kind": "genarm",
                "arms": {
                    "positive": str(demo / "arm-positive/final"),
                    "brief": str(demo / "arm-brief/final"),
                },
                "beta": 0.75,
            },
        ]
    config.update(routes=routes, output=str(out / "evaluate"))
    config["title"] = "MO-GRPO: one conditioned policy vs one run per α (embedded SmolLM2)"
    path = out / "evaluate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "align", "evaluate", str(path)], check=True)
    times["sweep"] = time.perf_counter() - start
    print("wall time (s):", {k: round(v, 1) for k, v in times.items()})
    print((out / "evaluate" / "summary.md").read_text())


if __name__ == "__main__":
    typer.run(main)
