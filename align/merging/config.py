"""Merge configs (YAML, in the spirit of mergekit's) and running them: ``align merge CONFIG OUT``.

.. code-block:: yaml

    merge_method: ties            # any registered method, "lora", or "pareto"
    models:                       # one per objective, in α order
      - model: path/to/helpful    # a checkpoint folder (or an embedded model name)
        objective: helpful
      - model: path/to/harmless
        objective: harmless
    base_model: smollm2-135m-instruct
    parameters: {density: 0.5, lambda: 1.0}
    preference: {helpful: 0.7, harmless: 0.3}   # one α: OUT is that checkpoint
    # sweep: 10                   # or the simplex grid with step 1/10 (11 checkpoints in OUT)
    # sweep: [[0.2, 0.8], [0.5, 0.5]]   # or a list of α
    dtype: bfloat16               # output dtype (default: as the inputs)
    max_shard_size: 5GB
    # pass_size: 2                # a sweep's α per pass over the inputs (default: all in one
    #                             # pass); an interrupted sweep resumes from the finished α

``merge_method: lora`` takes PEFT adapter folders as models and ``parameters: {output: adapter}``
(or ``checkpoint`` with a base_model). ``merge_method: pareto`` trains a Pareto-merging artifact
into OUT (parameters: :class:`~align.merging.pareto.ParetoMergeOptions`); a config with
``artifact: FOLDER`` and a preference or sweep (no models) materialises checkpoints from one.

Where mergekit gives each model a ``weight``, align takes α (with its objective names): the
weights are the preference, validated as one (non-negative, summing to 1).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.config import ConfigError, read_config
from align.merging.registry import METHODS, get_merge_method

TOP_LEVEL_KEYS = frozenset(
    {
        "merge_method",
        "models",
        "base_model",
        "parameters",
        "preference",
        "sweep",
        "dtype",
        "max_shard_size",
        "pass_size",
        "artifact",
        "name",
        "description",
    }
)


class MergeConfigError(ConfigError):
    """A merge config is malformed; the message lists every problem."""


@dataclass
class MergeConfig:
    merge_method: str
    models: dict[str, str] = field(default_factory=dict)
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    preference: Any = None
    sweep: Any = None
    dtype: str | None = None
    max_shard_size: int | str = "5GB"
    artifact: str | None = None
    pass_size: int | None = None


def parse_merge_config(data: Mapping[str, Any], source: str = "config") -> MergeConfig:
    """Validate a config mapping; every problem is reported in one :class:`MergeConfigError`."""
    problems: list[str] = []
    if not isinstance(data, Mapping):
        raise MergeConfigError(f"{source}: a merge config is a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - TOP_LEVEL_KEYS)
    if unknown:
        problems.append(f"unknown merge config fields {unknown}; known: {sorted(TOP_LEVEL_KEYS)}")
    method = data.get("merge_method")
    method_class = None
    if not isinstance(method, str) or not method:
        problems.append(
            "merge_method is required (e.g. linear, task_arithmetic, ties, dare_ties, lora, pareto)"
        )
    else:
        try:
            method_class = METHODS.get(method)
        except ValueError as error:
            problems.append(str(error))
    trains_artifact = getattr(method_class, "trains_artifact", False)
    models: dict[str, str] = {}
    raw_models = data.get("models")
    if data.get("artifact") is None:
        if not isinstance(raw_models, list) or len(raw_models) < 2:
            problems.append(
                "models must list at least two entries, each {model: PATH, objective: NAME}"
            )
        else:
            for index, entry in enumerate(raw_models):
                if (
                    not isinstance(entry, Mapping)
                    or "model" not in entry
                    or "objective" not in entry
                ):
                    problems.append(
                        f"models[{index}] must be {{model: PATH, objective: NAME}}, got {entry!r}"
                    )
                    continue
                extra = sorted(set(entry) - {"model", "objective"})
                if extra:
                    problems.append(
                        f"models[{index}] has {extra}: per-model weights are the preference α "
                        f"(give `preference:` or `sweep:`); method options go under `parameters:`"
                    )
                name = str(entry["objective"])
                if name in models:
                    problems.append(f"objective {name!r} is named by two models")
                models[name] = str(entry["model"])
    elif raw_models:
        problems.append(
            "give either models (to merge or train) or artifact (to materialise), not both"
        )
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        problems.append(f"parameters must be a mapping, got {parameters!r}")
        parameters = {}
    has_pref, has_sweep = data.get("preference") is not None, data.get("sweep") is not None
    if data.get("artifact") is not None and method_class is not None and not trains_artifact:
        problems.append(f"`artifact:` is for merges that train one (pareto), not {method!r}")
    if trains_artifact and data.get("artifact") is None:
        if has_pref or has_sweep:
            problems.append(
                f"merge_method {method} trains an artifact into OUT; materialise α from it with a "
                "second config that names `artifact: OUT` and a preference or sweep"
            )
    elif has_pref == has_sweep:
        problems.append(
            "give exactly one of preference (one α) or sweep (an integer grid size or a list of α)"
        )
    sweep = data.get("sweep")
    if has_sweep and isinstance(sweep, int) and (isinstance(sweep, bool) or sweep < 1):
        problems.append(
            f"sweep must be an integer >= 1 (grid step 1/sweep) or a list of α, got {sweep!r}"
        )
    pass_size = data.get("pass_size")
    if pass_size is not None and (
        isinstance(pass_size, bool) or not isinstance(pass_size, int) or pass_size < 1
    ):
        problems.append(f"pass_size must be an integer >= 1 (α per pass), got {pass_size!r}")
    elif pass_size is not None and not has_sweep:
        problems.append("pass_size is for sweeps (α per pass over the inputs); give `sweep:`")
    if problems:
        raise MergeConfigError(
            f"{source}: " + "; ".join(problems)
            if len(problems) == 1
            else f"{source} has {len(problems)} problems:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    return MergeConfig(
        merge_method=method,
        models=models,
        base_model=None if data.get("base_model") is None else str(data["base_model"]),
        parameters=dict(parameters),
        preference=data.get("preference"),
        sweep=sweep,
        dtype=data.get("dtype"),
        max_shard_size=data.get("max_shard_size", "5GB"),
        artifact=None if data.get("artifact") is None else str(data["artifact"]),
        pass_size=pass_size,
    )


def load_merge_config(path: str | os.PathLike) -> MergeConfig:

    try:
        data = read_config(path, "merge config")
    except ConfigError as error:
        raise MergeConfigError(str(error)) from error
    return parse_merge_config(data, str(path))


def run_merge_config(
    config: MergeConfig, out: str | os.PathLike, *, overwrite: bool = False
) -> list[Path]:
    """Run a parsed config; returns the folders written (the artifact for ``pareto``)."""
    return get_merge_method(config.merge_method, **config.parameters).run(
        config, Path(out), overwrite=overwrite
    )
