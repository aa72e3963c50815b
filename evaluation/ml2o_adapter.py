"""GML2O vs MGDA as the aggregator of a real adapter-training run on the embedded SmolLM2.

    OMP_NUM_THREADS=2 python evaluation/ml2o_adapter.py                       # 10 steps each
    OMP_NUM_THREADS=2 python evaluation/ml2o_adapter.py --steps 20 --methods gml2o mgda ml2o

Runs ``recipes/parm_cpu.yaml`` (PARM: PBLoRA on SmolLM2-135M-Instruct, objectives
positive / brief, AdamW) once per method with only ``args.aggregator`` changed (plus
``max_steps``, per-step logging and a temporary output folder): the same data order, α draws and
initial adapter. The same as, by hand::

    align train recipes/parm_cpu.yaml --set args.aggregator=gml2o --set args.max_steps=10 \\
        --set args.output_dir=/tmp/x

Prints per method: the training losses per objective (mean of the first and of the last three
logged steps), the held-out loss and pairwise accuracy per objective (each objective at its own
vertex α, as the trainer evaluates), seconds per step, and GML2O's acceptance rate.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHOWN = ("learning_rate", "beta", "target_modules", "max_length", "per_device_train_batch_size")


def run(recipe: dict, method: str, steps: int, workdir: Path) -> dict:
    from align.train import build_trainer

    recipe = copy.deepcopy(recipe)
    recipe["args"].update(
        aggregator=method,
        # MGDA / GML2O ignore α: PARM refuses them unless allowed (they learn one trade-off).
        allow_preference_blind_aggregator=True,
        max_steps=steps,
        output_dir=str(workdir / method),
        logging_steps=1,
        save_steps=10 * steps,
        report_to="none",
    )
    trainer = build_trainer(recipe)
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    history = [h for h in trainer.state.log_history if any(k.startswith("loss/") for k in h)]
    evaluation = trainer.evaluate()
    names = list(trainer.objectives)
    out = {"method": method, "seconds_per_step": seconds / steps, "objectives": names}
    for name in names:
        series = [h[f"loss/{name}"] for h in history if f"loss/{name}" in h]
        out[f"train_first/{name}"] = float(np.mean(series[:3]))
        out[f"train_last/{name}"] = float(np.mean(series[-3:]))
        out[f"eval_loss/{name}"] = evaluation.get(f"eval_loss/{name}")
        out[f"eval_accuracy/{name}"] = evaluation.get(f"eval_accuracy/{name}")
    accepted = [h["gml2o/accepted"] for h in history if "gml2o/accepted" in h]
    out["acceptance_rate"] = float(np.mean(accepted)) if accepted else None
    out["parameters"] = sum(p.numel() for p in trainer.engine.parameters)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="recipes/parm_cpu.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=["gml2o", "mgda"])
    args = parser.parse_args(argv)
    from align.train import load_recipe

    # Read once: every method trains from the same recipe, even if the file changes meanwhile.
    recipe = load_recipe(args.recipe)
    settings = {k: recipe["args"].get(k) for k in SHOWN}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            rows.append(run(recipe, method, args.steps, Path(tmp)))
    names = rows[0]["objectives"]
    print(
        f"\n{args.recipe}, {args.steps} steps, trainable (adapter) parameters P = "
        f"{rows[0]['parameters']}; recipe args: {settings}\n"
    )
    header = ["method", "s/step", "accepted"]
    for name in names:
        header += [f"train {name} first→last3", f"eval loss {name}", f"eval acc {name}"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [
            row["method"],
            f"{row['seconds_per_step']:.2f}",
            "-" if row["acceptance_rate"] is None else f"{row['acceptance_rate']:.2f}",
        ]
        for name in names:
            cells += [
                f"{row[f'train_first/{name}']:.4f} → {row[f'train_last/{name}']:.4f}",
                f"{row[f'eval_loss/{name}']:.4f}",
                f"{row[f'eval_accuracy/{name}']:.3f}",
            ]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
