"""The streaming merge: inputs read once, tensor by tensor, into one or many output checkpoints.

For each tensor name (in the storage order of the first model, so reads are sequential):

1. read it from the base (if the method uses one) and from each of the K models — one read each;
2. ``method.prepare`` the α-independent part (task vectors, trimming, drop masks) once;
3. for each of the S preferences, ``method.apply`` and append the result to that preference's
   output shard on disk, then drop it.

So a sweep of S preferences reads every input tensor exactly once and writes S checkpoints, and
peak memory is the K (+1) input tensors of one name, their prepared form and one output tensor,
independent of the model size and of S. Every output folder is built under a temporary name and
renamed into place only when complete (:func:`align.io.atomic_directory`); a sweep renames its
whole folder at once.

Non-floating tensors (integer buffers) are not merged: they are copied from the base model, or
the first model when there is no base.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from align.io import atomic_directory
from align.merging.io import (
    TOKENIZER_FILES,
    Checkpoint,
    OutputTensor,
    StreamingWriter,
    copy_side_files,
    dtype_from_name,
)
from align.merging.registry import get_merge_method
from align.merging.validation import MergeInputError, check_compatible
from align.preference import Preference, check_objectives, simplex_grid

logger = logging.getLogger(__name__)

MERGE_INFO = "align_merge.json"
SWEEP_INFO = "sweep.json"


@dataclass
class MergeInputs:
    """The validated inputs of a merge: one checkpoint per objective, and the base."""

    objectives: tuple[str, ...]
    models: list[Checkpoint]
    base: Checkpoint | None = None
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def reference(self) -> Checkpoint:
        return self.base if self.base is not None else self.models[0]

    def all_checkpoints(self) -> list[Checkpoint]:
        return [*self.models, *([self.base] if self.base is not None else [])]


def open_inputs(
    models: Mapping[str, str | os.PathLike] | Sequence[tuple[str, str | os.PathLike]],
    base_model: str | os.PathLike | None = None,
) -> MergeInputs:
    """Open and validate the inputs: ``{objective: folder}`` (in α order) and an optional base.

    Embedded model names (``"smollm2-135m-instruct"``) resolve to their cached checkpoint.
    Raises :class:`~align.merging.validation.MergeInputError` listing every mismatch.
    """
    pairs = list(models.items()) if isinstance(models, Mapping) else list(models)
    objectives = check_objectives([name for name, _ in pairs])
    opened: list[Checkpoint] = []
    problems: list[str] = []
    sources: dict[str, str] = {}
    for label, reference in [*pairs, *([("base", base_model)] if base_model is not None else [])]:
        try:
            path = _resolve(reference)
            opened.append(Checkpoint(path, label=f"{label} ({reference})"))
            sources[label] = str(path)
        except (OSError, ValueError) as error:
            problems.append(f"{label}: {error}")
    if problems:
        raise MergeInputError(problems)
    inputs = MergeInputs(
        objectives=objectives,
        models=opened[: len(pairs)],
        base=opened[len(pairs)] if base_model is not None else None,
        sources=sources,
    )
    check_compatible(inputs.all_checkpoints())
    return inputs


def _resolve(reference: str | os.PathLike) -> Path:
    """A local folder as it is; an embedded model name (e.g. ``smollm2-135m-instruct``) via its
    cache. transformers is imported only in the second case (it takes seconds to import)."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return path
    from align.models.loading import resolve_model_path

    return Path(resolve_model_path(reference))


def as_preferences(value: Any, objectives: Sequence[str]) -> Preference:
    """One α or a batch: a Preference, dict, vector, ``(S, K)`` array or ``"a=0.3,b=0.7"``."""
    return Preference.coerce(value, objectives)


def sweep_preferences(objectives: Sequence[str], divisions: int = 10) -> Preference:
    """The uniform simplex grid (``divisions = 10`` and two objectives: the usual 11 points)."""
    return Preference(simplex_grid(len(check_objectives(objectives)), divisions), objectives)


def preference_folder_name(preference: Preference) -> str:
    """``helpful_0.3-harmless_0.7``: readable, sortable, no characters shells dislike."""
    return "-".join(f"{name}_{round(float(w), 6):g}" for name, w in preference.to_dict().items())


def _compute_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _plan(inputs: MergeInputs, dtype: torch.dtype | None) -> list[OutputTensor]:
    reference = inputs.models[0]
    plan = []
    for name in reference.names:
        info = inputs.reference.tensors[name]
        out_dtype = dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype
        plan.append(OutputTensor(name, out_dtype, info.shape))
    return plan


def _read_stack(models: Sequence[Checkpoint], name: str, dtype: torch.dtype) -> torch.Tensor:
    """The K input tensors of one name as one ``(K, *shape)`` tensor, each read exactly once."""
    first = models[0].get_tensor(name)
    stacked = torch.empty((len(models), *first.shape), dtype=dtype)
    stacked[0] = first
    del first
    for k, model in enumerate(models[1:], start=1):
        stacked[k] = model.get_tensor(name)  # copied into place, the read tensor freed at once
    return stacked


def _copy_side_files(inputs: MergeInputs, folder: Path, dtype: torch.dtype | None) -> None:
    copied = copy_side_files(inputs.reference.folder, folder, dtype=dtype)
    if not any(name in copied for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        # A fine-tuned copy saved without its tokenizer: take it from an input that has one.
        for checkpoint in inputs.all_checkpoints():
            if checkpoint.has_tokenizer():
                copy_side_files(checkpoint.folder, folder, names=TOKENIZER_FILES)
                break


def stream_merge(
    inputs: MergeInputs,
    method: Any,
    preferences: Preference,
    folders: Sequence[Path],
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    info: Mapping[str, Any] | None = None,
) -> None:
    """Merge ``inputs`` at each α of ``preferences`` (a batch) into the matching folder.

    The folders must exist (temporary folders; the caller renames them). One read per input
    tensor, whatever the number of preferences.
    """
    if not preferences.is_batched:
        preferences = Preference(preferences.weights[None], preferences.objectives)
    if preferences.objectives != inputs.objectives:
        raise ValueError(
            f"preference objectives {preferences.objectives} differ from the models' "
            f"{inputs.objectives}"
        )
    if len(folders) != len(preferences):
        raise ValueError(f"{len(preferences)} preferences but {len(folders)} output folders")
    if method.needs_base and inputs.base is None:
        raise ValueError(
            f"merge method {method.name!r} needs a base_model (task vectors θ_k − θ_base)"
        )
    if not method.needs_base and inputs.base is not None:
        raise ValueError(
            f"merge method {method.name!r} uses no base model; remove base_model "
            f"(or use task_arithmetic, which with lambda 1 is the same interpolation)"
        )
    plan = _plan(inputs, dtype)
    metadata = {"merged_by": "align", "merge_method": method.name}
    writers = [
        StreamingWriter(f, plan, max_shard_size=max_shard_size, metadata=metadata) for f in folders
    ]
    try:
        for item in plan:
            name = item.name
            ref_info = inputs.reference.tensors[name]
            if not ref_info.dtype.is_floating_point:
                value = inputs.reference.get_tensor(name)
                for writer in writers:
                    writer.write(name, value)
                continue
            compute = _compute_dtype([m.tensors[name].dtype for m in inputs.all_checkpoints()])
            stacked = _read_stack(inputs.models, name, compute)
            base = inputs.base.get_tensor(name).to(compute) if method.needs_base else None
            prepared = method.prepare(name, stacked, base)
            del stacked, base
            for row, writer in enumerate(writers):
                weights = preferences.weights[row].to(compute)
                merged = method.apply(prepared, weights)
                writer.write(name, merged.to(item.dtype))
                del merged
            del prepared
        for folder, writer, preference in zip(folders, writers, preferences):
            writer.close()
            _copy_side_files(inputs, folder, dtype)
            record = {
                **(info or {}),
                "merge_method": method.name,
                "parameters": dict(getattr(method, "params", {})),
                "objectives": list(inputs.objectives),
                "preference": preference.to_dict(),
                "models": {name: inputs.sources[name] for name in inputs.objectives},
                "base_model": inputs.sources.get("base"),
                "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
            }
            (folder / MERGE_INFO).write_text(json.dumps(record, indent=2) + "\n")
    except BaseException:
        for writer in writers:
            writer.abort()
        raise


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another folder or pass overwrite=True")


def merge_checkpoints(
    models: Mapping[str, str | os.PathLike] | MergeInputs,
    out: str | os.PathLike,
    *,
    method: str | Any = "linear",
    parameters: Mapping[str, Any] | None = None,
    base_model: str | os.PathLike | None = None,
    preference: Any = None,
    sweep: int | Any | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> list[Path]:
    """Merge HF checkpoints along α and write the result(s) atomically; returns the folders.

    ``models`` maps objective names (in α order) to checkpoint folders or embedded model names.
    Give either ``preference`` (one α: ``out`` becomes that checkpoint) or ``sweep``: an integer
    n for the uniform simplex grid with step 1/n, or a batch of α — ``out`` then holds one
    checkpoint per α (named like ``helpful_0.3-harmless_0.7``) and ``sweep.json``.
    """
    out = Path(out)
    method = get_merge_method(method, **dict(parameters or {}))
    if getattr(method, "kind", "tensor") != "tensor" and not hasattr(method, "prepare"):
        raise ValueError(
            f"merge method {method.name!r} merges adapters; use align.merging.merge_lora_adapters"
        )
    inputs = models if isinstance(models, MergeInputs) else open_inputs(models, base_model)
    if (preference is None) == (sweep is None):
        raise ValueError("give exactly one of preference (one α) or sweep (a grid or a list of α)")
    out_dtype = None if dtype is None else dtype_from_name(dtype)
    _check_target(out, overwrite)
    started = time.perf_counter()
    if preference is not None:
        alpha = as_preferences(preference, inputs.objectives)
        if alpha.is_batched:
            raise ValueError("preference must be one α; use sweep= for several")
        with atomic_directory(out, overwrite=overwrite) as tmp:
            stream_merge(
                inputs, method, alpha, [tmp], dtype=out_dtype, max_shard_size=max_shard_size
            )
        logger.info("merged into %s in %.1f s", out, time.perf_counter() - started)
        return [out]
    grid = (
        sweep_preferences(inputs.objectives, sweep)
        if isinstance(sweep, int) and not isinstance(sweep, bool)
        else as_preferences(sweep, inputs.objectives)
    )
    if not grid.is_batched:
        grid = Preference(grid.weights[None], grid.objectives)
    names = [preference_folder_name(p) for p in grid]
    if len(set(names)) != len(names):
        raise ValueError("the sweep lists the same α twice")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        folders = [tmp / name for name in names]
        for folder in folders:
            folder.mkdir()
        stream_merge(inputs, method, grid, folders, dtype=out_dtype, max_shard_size=max_shard_size)
        sweep_record = {
            "objectives": list(inputs.objectives),
            "merge_method": method.name,
            "checkpoints": [{"folder": n, "preference": p.to_dict()} for n, p in zip(names, grid)],
        }
        (tmp / SWEEP_INFO).write_text(json.dumps(sweep_record, indent=2) + "\n")
    logger.info(
        "merged %d checkpoints into %s in %.1f s", len(names), out, time.perf_counter() - started
    )
    return [out / name for name in names]


def merge_state_dicts(
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
    preference: Any,
    *,
    method: str | Any = "linear",
    parameters: Mapping[str, Any] | None = None,
    base: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The same merge on in-memory state dicts (``{objective: state_dict}``, in α order).

    For live models and small experiments; the streamed merge is what bounds memory.
    """
    method = get_merge_method(method, **dict(parameters or {}))
    objectives = check_objectives(list(state_dicts))
    alpha = as_preferences(preference, objectives)
    if method.needs_base and base is None:
        raise ValueError(f"merge method {method.name!r} needs a base state dict")
    models = list(state_dicts.values())
    merged = {}
    for name, first in models[0].items():
        if not first.dtype.is_floating_point:
            merged[name] = (base or models[0])[name]
            continue
        compute = _compute_dtype([m[name].dtype for m in models])
        stacked = torch.stack([m[name].to(compute) for m in models])
        base_tensor = base[name].to(compute) if method.needs_base else None
        value = method.merge(name, stacked, base_tensor, alpha.weights.to(compute))
        merged[name] = value.to(first.dtype)
    return merged
