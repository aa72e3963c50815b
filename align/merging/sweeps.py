"""Sweep folders: one merged checkpoint per α, written by :func:`write_sweep`, resumable.

:func:`sweep_grid` turns a config's ``sweep:`` (a grid size or a list of α) into a batch of α;
:func:`write_sweep` is the one writer of sweep folders, used by every merge that writes
checkpoints (the streaming engine, LoRA interpolation, Pareto artifacts). A sweep interrupted
part-way resumes from the α it had finished when it is re-run on the same job; the job names
its inputs by :func:`input_signature` (path and content digest, not modification times).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from align.io import atomic_directory, content_digest
from align.merging.checkpoint_io import MERGE_INFO
from align.preference import Preference, check_objectives, simplex_grid

#: The record of a sweep folder: its checkpoints, one per α, and their preferences.
SWEEP_INFO = "sweep.json"
#: What a sweep's staging folder is producing (removed when it finishes); a re-run of the same
#: sweep adopts a staging folder left by a process that is gone only if this matches.
SWEEP_JOB = ".align-sweep-job.json"

logger = logging.getLogger(__name__)


def preference_folder_name(preference: Preference) -> str:
    """``helpful_0.3-harmless_0.7``: readable, sortable, no characters shells dislike."""
    return "-".join(f"{name}_{round(float(w), 6):g}" for name, w in preference.to_dict().items())


def sweep_preferences(objectives: Sequence[str], divisions: int = 10) -> Preference:
    """The uniform simplex grid (``divisions = 10`` and two objectives: the usual 11 points)."""
    return Preference(simplex_grid(len(check_objectives(objectives)), divisions), objectives)


def sweep_grid(sweep: Any, objectives: Sequence[str]) -> Preference:
    """A sweep as a batch of α: an integer n is the simplex grid with step 1/n, anything else
    one α or a list of them (always returned batched)."""
    if isinstance(sweep, int) and not isinstance(sweep, bool):
        return sweep_preferences(objectives, sweep)
    grid = Preference.coerce(sweep, objectives)
    return grid if grid.is_batched else Preference(grid.weights[None], grid.objectives)


def input_signature(path: str | os.PathLike) -> list[str]:
    """What a sweep input is, for resuming: its path and the digest of what it contains
    (:func:`align.io.content_digest`), so a sweep resumes after its inputs were copied or
    touched, and is redone when they were changed in place (same size, other bytes)."""
    path = Path(path)
    return [str(path), content_digest(path) if path.exists() else ""]


def write_sweep(
    out: str | os.PathLike,
    grid: Preference,
    produce: Callable[[Preference, list[Path]], None],
    *,
    merge_method: str,
    job: Mapping[str, Any],
    overwrite: bool = False,
    pass_size: int | None = None,
) -> list[Path]:
    """The one writer of sweep folders: one checkpoint per α in ``out``, plus :data:`SWEEP_INFO`.

    ``produce(alphas, folders)`` writes one finished checkpoint (with its :data:`MERGE_INFO`)
    per α into each (existing, empty) folder. It is called on ``pass_size`` α at a time (all at
    once by default: one pass over the inputs); each α's folder is atomic inside the sweep's
    staging folder, and the sweep folder is renamed into place when every α is done.

    Interrupted sweeps resume: a staging folder beside ``out`` left by a process that is gone is
    adopted when it was producing the same ``job`` (method, parameters, inputs, dtype, ...;
    inputs named by :func:`input_signature`, so by content) — the α it had finished are kept
    and only the others are produced — and removed otherwise.
    Ctrl-C keeps the staging folder for that; other errors remove it.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another folder or pass overwrite=True")
    if pass_size is not None and (
        isinstance(pass_size, bool) or not isinstance(pass_size, int) or pass_size < 1
    ):
        raise ValueError(f"pass_size must be an integer >= 1 (α per pass), got {pass_size!r}")
    if not grid.is_batched:
        grid = Preference(grid.weights[None], grid.objectives)
    names = [preference_folder_name(p) for p in grid]
    if len(set(names)) != len(names):
        raise ValueError("the sweep lists the same α twice")
    record = json.loads(
        json.dumps({**job, "merge_method": merge_method, "checkpoints": names}, default=str)
    )

    def same_job(folder: Path) -> bool:
        try:
            return json.loads((folder / SWEEP_JOB).read_text()) == record
        except (OSError, ValueError):
            return False

    with atomic_directory(out, overwrite=overwrite, adopt=same_job, keep_on_interrupt=True) as tmp:
        (tmp / SWEEP_JOB).write_text(json.dumps(record, indent=2) + "\n")
        todo = [i for i, name in enumerate(names) if not (tmp / name / MERGE_INFO).is_file()]
        if len(todo) < len(names):
            logger.info(
                "resuming the sweep into %s: %d of %d checkpoints were already finished",
                out,
                len(names) - len(todo),
                len(names),
            )
        step = pass_size or max(1, len(todo))
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            with contextlib.ExitStack() as stack:
                for i in chunk:  # a finished-looking folder without its record is redone
                    if (tmp / names[i]).exists():
                        shutil.rmtree(tmp / names[i])
                folders = [stack.enter_context(atomic_directory(tmp / names[i])) for i in chunk]
                produce(Preference(grid.weights[chunk], grid.objectives), folders)
        sweep_record = {
            "objectives": list(grid.objectives),
            "merge_method": merge_method,
            "checkpoints": [{"folder": n, "preference": p.to_dict()} for n, p in zip(names, grid)],
        }
        (tmp / SWEEP_INFO).write_text(json.dumps(sweep_record, indent=2) + "\n")
        (tmp / SWEEP_JOB).unlink()
    return [out / name for name in names]
