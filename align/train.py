"""Run a training recipe: ``align train RECIPE.yaml`` or, across processes,
``accelerate launch --config_file accelerate_configs/X.yaml -m align.train RECIPE.yaml``.

A recipe is a YAML file naming the trainer, the model, the data and the trainer's config
fields (the ``args`` block is the config dataclass, so every TRL / transformers option works)::

    trainer: parm                 # arm | parm | dpo
    model: smollm2-135m-instruct  # the embedded model, a local folder, or a hub id
    quantization: null            # 4bit | 8bit (bitsandbytes) | null
    data:
      path: recipes/data/positive_brief.jsonl
      layout: auto                # schema | pku_saferlhf | per_objective | auto
      test_size: 0.1              # held-out split (written beside the adapter)
    args:
      output_dir: runs/parm
      max_steps: 60

``--set args.max_steps=10`` overrides any field from the command line. A run whose output folder
has checkpoints resumes from the last one unless ``resume: false``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from align.errors import debug_requested, describe, user_error_types, yaml_problem

TRAINERS = {
    "arm": ("ARMTrainer", "ARMConfig"),
    "parm": ("PARMTrainer", "PARMConfig"),
    "dpo": ("PreferenceDPOTrainer", "PreferenceDPOConfig"),
}
RECIPE_KEYS = {"trainer", "model", "quantization", "dtype", "data", "args", "resume"}
DATA_KEYS = {"path", "sources", "layout", "test_size", "seed", "limit", "objectives"}


class RecipeError(ValueError):
    """A recipe that cannot run; the message says which field and why."""


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _numbers(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string, not a float; recipes mean the number."""
    if isinstance(value, dict):
        return {key: _numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_numbers(item) for item in value]
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    return value


def _parse_value(text: str) -> Any:
    try:
        return _numbers(yaml.safe_load(text))
    except yaml.YAMLError as error:
        raise RecipeError(
            f"override value {text!r} is not valid YAML: {yaml_problem(error)}"
        ) from error


def apply_overrides(recipe: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``key.sub=value`` assignments (values parsed as YAML) applied to a recipe."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key.sub=value")
        dotted, value = item.split("=", 1)
        node = recipe
        keys = dotted.strip().split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {key!r} is not a section")
        node[keys[-1]] = _parse_value(value)
    return recipe


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read and check a recipe; relative data paths are taken from the current folder first,
    then from the recipe's folder."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist")
    try:
        recipe = _numbers(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as error:
        raise RecipeError(
            f"recipe {str(path)!r} is not valid YAML: {yaml_problem(error)}"
        ) from error
    if not isinstance(recipe, dict):
        raise RecipeError(
            f"recipe {str(path)!r} must be a mapping of fields, got {type(recipe).__name__}"
        )
    recipe = apply_overrides(recipe, overrides)
    unknown = sorted(set(recipe) - RECIPE_KEYS)
    if unknown:
        raise RecipeError(f"unknown recipe fields {unknown}; known: {sorted(RECIPE_KEYS)}")
    if recipe.get("trainer") not in TRAINERS:
        raise RecipeError(
            f"recipe field 'trainer' must be one of {sorted(TRAINERS)}, got {recipe.get('trainer')!r}"
        )
    data = recipe.get("data")
    if not isinstance(data, dict) or not ({"path", "sources"} & set(data)):
        raise RecipeError("recipe field 'data' needs a 'path' (or 'sources' per objective)")
    unknown = sorted(set(data) - DATA_KEYS)
    if unknown:
        raise RecipeError(f"unknown data fields {unknown}; known: {sorted(DATA_KEYS)}")
    recipe.setdefault("args", {})
    if "output_dir" not in recipe["args"]:
        raise RecipeError("recipe field 'args.output_dir' is required (where checkpoints go)")
    recipe["_dir"] = str(path.parent)
    return recipe


def _resolve(path: str, recipe_dir: str) -> str:
    if os.path.exists(path) or os.path.isabs(path):
        return path
    beside = os.path.join(recipe_dir, path)
    return beside if os.path.exists(beside) else path


def load_recipe_data(recipe: dict[str, Any]) -> tuple[Any, Any]:
    """The train and held-out splits named by a recipe's ``data`` block."""
    from align.data import load_preference_data, train_test_split_pairs

    data = recipe["data"]
    layout = str(data.get("layout", "auto")).replace("_", "-")
    if "sources" in data:
        sources = {name: _resolve(p, recipe["_dir"]) for name, p in data["sources"].items()}
        dataset = load_preference_data(sources, layout="per-objective")
    else:
        dataset = load_preference_data(_resolve(data["path"], recipe["_dir"]), layout=layout)
    if data.get("limit"):
        dataset = dataset.select(range(min(int(data["limit"]), len(dataset))))
    test_size = data.get("test_size", 0)
    if not test_size:
        return dataset, None
    split = train_test_split_pairs(dataset, test_size=test_size, seed=data.get("seed", 0))
    return split["train"], split["test"]


def _quantization_config(kind: str | None) -> Any:
    if kind in (None, "none"):
        return None
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise RecipeError(f"quantization must be 4bit, 8bit or null, got {kind!r}")


_NUMBERS = {bool: "true or false", int: "an integer", float: "a number"}


def _check_arg_types(config_class: type, args: dict[str, Any]) -> None:
    """A recipe value of the wrong simple type (``learning_rate: fast``) would fail deep inside
    the optimizer or the scheduler; name the field instead."""
    import types
    import typing

    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # an annotation that cannot be resolved: leave the check to the config
        return
    for name, value in args.items():
        hint = hints.get(name)
        if hint is None or value is None:
            continue
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        allowed = set(typing.get_args(hint)) if union else {hint}
        simple = [kind for kind in (bool, int, float) if kind in allowed]
        if not simple or allowed - {bool, int, float, type(None)}:
            continue  # str, enums, lists, dicts: the config checks them
        ok = (
            isinstance(value, bool)
            if simple == [bool]
            else (isinstance(value, (int, float)) and not isinstance(value, bool))
        )
        if float not in simple and int in simple and isinstance(value, float):
            ok = value.is_integer()
        if not ok:
            raise RecipeError(
                f"recipe field 'args.{name}' must be {_NUMBERS[simple[-1]]}, got {value!r}"
            )


def build_trainer(recipe: dict[str, Any]) -> Any:
    """The trainer a recipe describes, with its model, tokenizer and data loaded."""
    import align.trainers as trainers
    from align.models import load_model

    trainer_name, config_name = TRAINERS[recipe["trainer"]]
    config_class = getattr(trainers, config_name)
    _check_arg_types(config_class, recipe["args"])
    try:
        args = config_class(**recipe["args"])
    except TypeError as error:
        raise RecipeError(f"recipe 'args' do not fit {config_name}: {error}") from error
    train, held_out = load_recipe_data(recipe)
    quantization = _quantization_config(recipe.get("quantization"))
    model, tokenizer = load_model(
        recipe.get("model", "smollm2-135m-instruct"),
        dtype=recipe.get("dtype", "float32"),
        quantization_config=quantization,
    )
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=args.gradient_checkpointing
        )
    trainer = getattr(trainers, trainer_name)(
        model, args, train, eval_dataset=held_out, processing_class=tokenizer
    )
    trainer.held_out_pairs = held_out  # untokenized, saved beside the adapter for evaluation
    return trainer


def last_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint in ``output_dir`` (staged ones are never half-written)."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


def run_recipe(recipe: dict[str, Any]) -> Path:
    """Train as the recipe says, resuming from the last checkpoint; returns the final adapter
    folder (``<output_dir>/final``), with the held-out split saved beside it."""
    from align.data import save_preference_dataset

    trainer = build_trainer(recipe)
    output_dir = trainer.args.output_dir
    resume = recipe.get("resume", True)
    checkpoint = resume if isinstance(resume, str) else None
    if resume is True:
        checkpoint = last_checkpoint(output_dir)
    if checkpoint and trainer.is_world_process_zero():
        print(f"resuming from {checkpoint}")
    trainer.train(resume_from_checkpoint=checkpoint)
    final = trainer.save_final(Path(output_dir) / "final")
    if trainer.held_out_pairs is not None and trainer.is_world_process_zero():
        save_preference_dataset(trainer.held_out_pairs, Path(output_dir) / "held_out.jsonl")
    return final


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m align.train RECIPE.yaml [--set key=value ...]`` (what accelerate launches)."""
    import argparse

    parser = argparse.ArgumentParser(prog="align.train", description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--debug", action="store_true", help="Show the full traceback of an error (ALIGN_DEBUG=1)."
    )
    options = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch

        if not torch.cuda.is_available():
            # Launched as several processes on a machine without GPUs: without this, accelerate
            # gives every process a world of its own and they silently train alone.
            os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    try:
        final = run_recipe(load_recipe(options.recipe, options.overrides))
    except user_error_types() as error:
        if debug_requested(options.debug):
            raise
        sys.exit(f"error: {describe(error)}")
    print(f"adapter saved to {final}")


if __name__ == "__main__":
    main()
