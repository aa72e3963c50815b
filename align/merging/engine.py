"""The streaming merge: inputs read once, tensor by tensor, into one or many output checkpoints.

For each tensor name (in the storage order of the first model, so reads are sequential):

1. read it from the base (if the method uses one) and from each of the K models — one read each;
2. ``method.prepare`` the α-independent part (task vectors, trimming, drop masks) once;
3. for each of the S preferences, ``method.apply`` and append the result to that preference's
   output shard on disk, then drop it.

So a sweep of S preferences reads every input tensor exactly once and writes S checkpoints, and
peak memory is the K (+1) input tensors of one name, their prepared form and one output tensor,
independent of the model size and of S. Every output folder is built under a temporary name and
renamed into place only when complete (:func:`align.io.atomic_directory`); a sweep is written by
:func:`align.merging.sweeps.write_sweep`: each α's folder is atomic inside the sweep's staging
folder, the sweep folder is renamed into place when all are done, and a sweep interrupted
part-way resumes from the α it had finished (``pass_size`` α per pass over the inputs).

Non-floating tensors (integer buffers) are not merged: they are copied from the base model, or
the first model when there is no base.
"""

from __future__ import annotations

import logging
import os
import time
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from align.io import atomic_directory
from align.merging.base import Merge
from align.merging.checkpoint_io import (
    Checkpoint,
    StreamingWriter,
    copy_merge_side_files,
    dtype_from_name,
    output_plan,
    read_stack,
    resolve_checkpoint,
    write_merge_info,
)
from align.merging.registry import get_merge_method
from align.merging.sweeps import input_signature, sweep_grid, write_sweep
from align.merging.validation import MergeInputError, check_compatible
from align.preference import Preference, check_objectives

logger = logging.getLogger(__name__)


class MergeMethod(Merge):
    """One way to merge K tensors along α, streamed tensor by tensor by this engine.

    :meth:`prepare` does the α-independent work for one tensor once, :meth:`apply` turns it and
    one α into the merged tensor (see :mod:`align.merging.base`); the files of
    :mod:`align.merging.methods` hold these two, the math only.
    """

    #: Whether the method needs the base model (task vectors) — else it must not get one.
    needs_base: ClassVar[bool] = True

    def run(self, config: Any, out: Path, *, overwrite: bool = False) -> list[Path]:
        return merge_checkpoints(
            config.models,
            out,
            method=self,
            base_model=config.base_model,
            preference=config.preference,
            sweep=config.sweep,
            dtype=config.dtype,
            max_shard_size=config.max_shard_size,
            overwrite=overwrite,
            pass_size=config.pass_size,
        )

    @abstractmethod
    def prepare(self, name: str, tensors: Tensor, base: Tensor | None) -> Any:
        """α-independent work for one tensor. ``tensors`` is ``(K, *shape)``."""

    @abstractmethod
    def apply(self, prepared: Any, weights: Tensor) -> Tensor:
        """The merged tensor for α = ``weights`` (shape ``(K,)``, same dtype as the tensors)."""

    def merge(self, name: str, tensors: Tensor, base: Tensor | None, weights: Tensor) -> Tensor:
        """``apply(prepare(...), weights)``: one tensor, one α."""
        return self.apply(self.prepare(name, tensors, base), weights)


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
            path = resolve_checkpoint(reference)
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


def _compute_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def plan_outputs(inputs: MergeInputs, dtype: torch.dtype | None):
    """The output tensors of a merge of ``inputs`` (the first model's order, the reference's
    dtypes and shapes)."""
    return output_plan(inputs.models[0], inputs.reference, dtype)


def copy_inputs_side_files(inputs: MergeInputs, folder: Path, dtype: torch.dtype | None) -> None:
    """Config, tokenizer and generation files of a merge of ``inputs`` into ``folder``."""
    copy_merge_side_files(inputs.reference, inputs.all_checkpoints(), folder, dtype)


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
    plan = plan_outputs(inputs, dtype)
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
            stacked = read_stack(inputs.models, name, compute)
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
            copy_inputs_side_files(inputs, folder, dtype)
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
            write_merge_info(folder, record)
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
    pass_size: int | None = None,
) -> list[Path]:
    """Merge HF checkpoints along α and write the result(s) atomically; returns the folders.

    ``models`` maps objective names (in α order) to checkpoint folders or embedded model names.
    Give either ``preference`` (one α: ``out`` becomes that checkpoint) or ``sweep``: an integer
    n for the uniform simplex grid with step 1/n, or a batch of α — ``out`` then holds one
    checkpoint per α (named like ``helpful_0.3-harmless_0.7``) and ``sweep.json``.

    A sweep merges ``pass_size`` α per pass over the inputs (default: all of them, so every
    input tensor is read once). A sweep that is interrupted (killed, Ctrl-C) resumes when run
    again: the α it had finished are kept, the rest are merged (see
    :func:`~align.merging.sweeps.write_sweep`); with the default single pass the α finish together,
    so give a ``pass_size`` to make a long sweep resumable part-way.
    """
    out = Path(out)
    method = get_merge_method(method, **dict(parameters or {}))
    if not isinstance(method, MergeMethod):
        raise ValueError(
            f"merge method {method.name!r} does not merge checkpoint tensors; run it from a "
            f"merge config (align merge, align.merging.run_merge_config)"
        )
    inputs = models if isinstance(models, MergeInputs) else open_inputs(models, base_model)
    if (preference is None) == (sweep is None):
        raise ValueError("give exactly one of preference (one α) or sweep (a grid or a list of α)")
    out_dtype = None if dtype is None else dtype_from_name(dtype)
    _check_target(out, overwrite)
    started = time.perf_counter()
    if preference is not None:
        alpha = Preference.coerce(preference, inputs.objectives)
        if alpha.is_batched:
            raise ValueError("preference must be one α; use sweep= for several")
        with atomic_directory(out, overwrite=overwrite) as tmp:
            stream_merge(
                inputs, method, alpha, [tmp], dtype=out_dtype, max_shard_size=max_shard_size
            )
        logger.info("merged into %s in %.1f s", out, time.perf_counter() - started)
        return [out]
    grid = sweep_grid(sweep, inputs.objectives)
    job = {
        "parameters": dict(getattr(method, "params", {})),
        "models": {
            name: input_signature(inputs.sources[name])
            for name in [*inputs.objectives, *(["base"] if inputs.base is not None else [])]
        },
        "dtype": None if out_dtype is None else str(out_dtype),
        "max_shard_size": max_shard_size,
    }

    def produce(alphas: Preference, folders: list[Path]) -> None:
        stream_merge(
            inputs, method, alphas, folders, dtype=out_dtype, max_shard_size=max_shard_size
        )

    written = write_sweep(
        out,
        grid,
        produce,
        merge_method=method.name,
        job=job,
        overwrite=overwrite,
        pass_size=pass_size,
    )
    logger.info(
        "merged %d checkpoints into %s in %.1f s", len(written), out, time.perf_counter() - started
    )
    return written
