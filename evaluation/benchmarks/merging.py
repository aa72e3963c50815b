"""Benchmark: align's streaming merge vs mergekit on SmolLM2-135M, side by side, as ratios.

Inputs: the embedded SmolLM2-135M-Instruct checkpoint (align's cache, float32, 538 MB) as the
base and its two briefly fine-tuned copies from ``evaluation/pareto_merging.py`` (built there
once and cached). Every run is a child process, measured from outside: wall time, and peak
memory as the child's maximum resident set (``resource.getrusage(RUSAGE_CHILDREN)`` in a fresh
wrapper process per run, so runs do not share a maximum). Rows:

  * one linear merge (α = (0.5, 0.5)): ``align merge`` vs ``mergekit-yaml`` (merge_method linear);
  * one TIES merge (density 0.5, α = (0.5, 0.5)): ``align merge`` vs ``mergekit-yaml`` (ties);
  * an 11-point α sweep (linear): ONE ``align merge`` with ``sweep: 10`` (each input tensor read
    once, 11 checkpoints written) vs 11 ``mergekit-yaml`` runs, one per α (mergekit merges one
    model per run).

The outputs of each single merge are compared tensor by tensor (max |difference|), so the two
tools are shown to compute the same model. Runs alternate between the tools, after one
untimed read of every input file (so neither pays for a cold page cache). Both tools run with
the same ``OMP_NUM_THREADS`` (``--threads``, default 1: on a shared 2-core machine OpenMP's
spin-waiting makes two threads slower than one).

mergekit is called through its CLI ``mergekit-yaml`` from ``--mergekit-bin`` (default: the
one next to this Python; ``pip install mergekit`` installs it, align does not depend on it).

    python evaluation/benchmarks/merging.py [--repeats 1] [--skip-sweep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # evaluation/ for the inputs

from pareto_merging import OBJECTIVES, derived_checkpoints  # noqa: E402

from align.merging.checkpoint_io import MERGE_INFO  # noqa: E402
from align.preference import simplex_grid  # noqa: E402

MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
    "wall = time.perf_counter() - start\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(json.dumps({'code': code, 'wall': wall, 'peak_mb': peak / 1024}))\n"
)


THREADS = {"OMP_NUM_THREADS": "1"}


def measure(command: list[str]) -> dict:
    """Wall time and peak RSS of one child process (a fresh wrapper, so the maximum is its own)."""
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, *command],
        capture_output=True,
        text=True,
        env={**os.environ, **THREADS},
    )
    if result.returncode != 0 or not result.stdout.strip():
        raise RuntimeError(f"measuring {command} failed: {result.stderr[-2000:]}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    if record["code"] != 0:
        raise RuntimeError(f"{command} exited with {record['code']}: {result.stderr[-2000:]}")
    return record


def warm(folders: list[Path]) -> None:
    for folder in folders:
        for path in folder.glob("*.safetensors"):
            with open(path, "rb") as handle:
                while handle.read(1 << 24):
                    pass


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                found[key] = handle.get_tensor(key)
    return found


def max_difference(a: Path, b: Path) -> float:
    left, right = tensors(a), tensors(b)
    shared = set(left) & set(right)
    if not shared:
        raise RuntimeError(f"{a} and {b} share no tensor names")
    return max(float((left[n].float() - right[n].float()).abs().max()) for n in shared)


def align_config(method: str, folders: dict, alpha=None, sweep=None) -> dict:
    config = {
        "merge_method": method,
        "models": [{"model": str(folders[o]), "objective": o} for o in OBJECTIVES],
        "dtype": "float32",
    }
    if method == "ties":
        config["base_model"] = str(folders["base"])
        config["parameters"] = {"density": 0.5}
    if sweep is not None:
        config["sweep"] = sweep
    else:
        config["preference"] = dict(zip(OBJECTIVES, alpha))
    return config


def mergekit_config(method: str, folders: dict, alpha) -> dict:
    models = []
    for objective, weight in zip(OBJECTIVES, alpha):
        parameters = {"weight": float(weight)}
        if method == "ties":
            parameters["density"] = 0.5
        models.append({"model": str(folders[objective]), "parameters": parameters})
    config = {"merge_method": method, "models": models, "dtype": "float32"}
    if method == "ties":
        config["base_model"] = str(folders["base"])
        config["parameters"] = {"normalize": True}
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument(
        "--mergekit-bin", type=Path, default=Path(sys.executable).parent / "mergekit-yaml"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="OMP_NUM_THREADS for both tools (same for both)"
    )
    parser.add_argument("--align-bin", type=Path, default=Path(sys.executable).parent / "align")
    args = parser.parse_args()
    if not args.mergekit_bin.exists():
        sys.exit(
            f"no mergekit-yaml at {args.mergekit_bin}; `pip install mergekit` or pass --mergekit-bin"
        )

    THREADS["OMP_NUM_THREADS"] = str(args.threads)
    folders = derived_checkpoints()
    warm([folders["base"], *(folders[o] for o in OBJECTIVES)])
    work = Path(tempfile.mkdtemp(prefix="merge-bench-"))
    mergekit_flags = ["--no-cuda", "--no-write-model-card", "--quiet"]
    rows = []
    try:
        for method in ("linear", "ties"):
            alpha = (0.5, 0.5)
            a_cfg, m_cfg = work / f"align_{method}.yaml", work / f"mergekit_{method}.yaml"
            a_cfg.write_text(yaml.safe_dump(align_config(method, folders, alpha)))
            m_cfg.write_text(yaml.safe_dump(mergekit_config(method, folders, alpha)))
            for repeat in range(args.repeats):
                a_out, m_out = work / f"a_{method}_{repeat}", work / f"m_{method}_{repeat}"
                ours = measure([str(args.align_bin), "merge", str(a_cfg), str(a_out)])
                theirs = measure([str(args.mergekit_bin), str(m_cfg), str(m_out), *mergekit_flags])
                difference = max_difference(a_out, m_out)
                rows.append((f"{method} merge", ours, theirs, difference))
                shutil.rmtree(a_out)
                shutil.rmtree(m_out)
        if not args.skip_sweep:
            grid = simplex_grid(2, 10).tolist()
            a_cfg = work / "align_sweep.yaml"
            a_cfg.write_text(yaml.safe_dump(align_config("linear", folders, sweep=10)))
            ours = measure([str(args.align_bin), "merge", str(a_cfg), str(work / "a_sweep")])
            theirs = {"wall": 0.0, "peak_mb": 0.0}
            for index, alpha in enumerate(grid):
                m_cfg = work / f"mergekit_sweep_{index}.yaml"
                m_cfg.write_text(yaml.safe_dump(mergekit_config("linear", folders, alpha)))
                out = work / f"m_sweep_{index}"
                run = measure([str(args.mergekit_bin), str(m_cfg), str(out), *mergekit_flags])
                theirs["wall"] += run["wall"]
                theirs["peak_mb"] = max(theirs["peak_mb"], run["peak_mb"])
                if index in (0, 4, 10):
                    sweep_folder = sorted(p for p in (work / "a_sweep").iterdir() if p.is_dir())
                    mine = [
                        p
                        for p in sweep_folder
                        if json.loads((p / MERGE_INFO).read_text())["preference"][OBJECTIVES[0]]
                        == alpha[0]
                    ]
                    difference = max_difference(mine[0], out)
                    print(f"  sweep α={alpha}: max |align − mergekit| = {difference:.2e}")
                shutil.rmtree(out)
            rows.append(("11-point α sweep (linear)", ours, theirs, None))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"{'run':<28}{'align s':>9}{'mergekit s':>12}{'speed-up':>10}{'align MB':>10}{'mergekit MB':>13}{'max |Δ|':>10}"
    )
    for label, ours, theirs, difference in rows:
        print(
            f"{label:<28}{ours['wall']:>9.1f}{theirs['wall']:>12.1f}{theirs['wall'] / ours['wall']:>9.2f}x"
            f"{ours['peak_mb']:>10.0f}{theirs['peak_mb']:>13.0f}"
            f"{'' if difference is None else f'{difference:.1e}':>10}"
        )
    print(
        "peak MB: maximum resident set of the merging process; the sweep's mergekit figure is the "
        "largest of its 11 runs, its time their sum"
    )


if __name__ == "__main__":
    main()
