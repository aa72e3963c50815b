"""Run a training recipe: ``align train RECIPE.yaml`` or, across processes,
``accelerate launch --config_file accelerate_configs/X.yaml -m align.train RECIPE.yaml``.

A recipe is a YAML file naming the trainer, the model, the data and the trainer's config
fields (the ``args`` block is the config dataclass, so every TRL / transformers option works)::

    trainer: parm                 # arm | parm | dpo | mo_grpo
    model: smollm2-135m-instruct  # the embedded model, a local folder, or a hub id
    quantization: null            # 4bit | 8bit (bitsandbytes) | null
    data:
      path: recipes/data/positive_brief.jsonl
      layout: auto                # schema | pku_saferlhf | per_objective | auto
      test_size: 0.1              # held-out split (written beside the adapter)
    args:
      output_dir: runs/parm
      max_steps: 60

Online RL (``trainer: mo_grpo``) reads prompts instead of pairs: ``data.path`` is a file with a
``prompt`` column (a preference dataset works: its distinct prompts) or ``shipped`` (align's
prompt set); its rewards are ``args.rewards`` (objective → scorer / ``arm:`` / ``parm:``).

``--set args.max_steps=10`` overrides any field from the command line. A run whose output folder
has checkpoints resumes from the last one unless ``resume: false``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from align.config import (
    ConfigError,
    apply_overrides,
    build_training_args,
    check_fields,
    read_config,
)
from align.distributed import leave_process_group
from align.errors import debug_requested, describe, user_error_types

RECIPE_KEYS = {"trainer", "model", "quantization", "dtype", "data", "args", "resume"}
DATA_KEYS = {"path", "sources", "layout", "test_size", "seed", "limit", "objectives"}

__all__ = ["RecipeError", "apply_overrides", "build_trainer", "load_recipe", "run_recipe"]


class RecipeError(ConfigError):
    """A recipe that cannot run; the message says which field and why."""


def _trainer_class(name: Any) -> type:
    from align.trainers.registry import TRAINERS

    try:
        return TRAINERS.get(name)
    except ValueError as error:
        raise RecipeError(f"recipe field 'trainer': {error}") from error


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read and check a recipe; relative data paths are taken from the current folder first,
    then from the recipe's folder."""
    try:
        recipe = read_config(path, "recipe", overrides)
        check_fields(recipe, RECIPE_KEYS, "recipe", required=["trainer"])
    except ConfigError as error:
        raise RecipeError(str(error)) from error
    _trainer_class(recipe["trainer"])
    data = recipe.get("data")
    if not isinstance(data, dict) or not ({"path", "sources"} & set(data)):
        raise RecipeError("recipe field 'data' needs a 'path' (or 'sources' per objective)")
    try:
        check_fields(data, DATA_KEYS, "data")
    except ConfigError as error:
        raise RecipeError(str(error)) from error
    recipe.setdefault("args", {})
    if "output_dir" not in recipe["args"]:
        raise RecipeError("recipe field 'args.output_dir' is required (where checkpoints go)")
    recipe["_dir"] = str(Path(path).parent)
    return recipe


def resolve_recipe_path(path: str, recipe_dir: str) -> str:
    """A recipe's data path: as given where it exists (or is absolute), else beside the recipe."""
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
        sources = {
            name: resolve_recipe_path(p, recipe["_dir"]) for name, p in data["sources"].items()
        }
        dataset = load_preference_data(sources, layout="per-objective")
    else:
        dataset = load_preference_data(
            resolve_recipe_path(data["path"], recipe["_dir"]), layout=layout
        )
    if data.get("limit"):
        dataset = dataset.select(range(min(int(data["limit"]), len(dataset))))
    test_size = data.get("test_size", 0)
    if not test_size:
        return dataset, None
    split = train_test_split_pairs(dataset, test_size=test_size, seed=data.get("seed", 0))
    return split["train"], split["test"]


def load_recipe_prompts(recipe: dict[str, Any]) -> tuple[Any, Any]:
    """The train and held-out prompt splits of an online-RL recipe's ``data`` block."""
    from align.data import load_prompt_dataset

    data = recipe["data"]
    if "sources" in data:
        raise RecipeError(
            "recipe field 'data.sources': online RL reads one prompt file (data.path)"
        )
    path = data["path"]
    source = path if path == "shipped" else resolve_recipe_path(path, recipe["_dir"])
    dataset = load_prompt_dataset(source, limit=data.get("limit"))
    test_size = data.get("test_size", 0)
    if not test_size:
        return dataset, None
    split = dataset.train_test_split(test_size=test_size, seed=data.get("seed", 0))
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


def build_trainer(recipe: dict[str, Any]) -> Any:
    """The trainer a recipe describes, with its model, tokenizer and data loaded."""
    from align.models import load_model

    trainer_class = _trainer_class(recipe["trainer"])
    try:
        args = build_training_args(
            trainer_class.config_class, recipe["args"], "recipe 'args'", "recipe field 'args.{}'"
        )
    except ConfigError as error:
        raise RecipeError(str(error)) from error
    prompts_only = getattr(trainer_class, "data_kind", "pairs") == "prompts"
    train, held_out = load_recipe_prompts(recipe) if prompts_only else load_recipe_data(recipe)
    quantization = _quantization_config(recipe.get("quantization"))
    model, tokenizer = load_model(
        recipe.get("model", "smollm2-135m-instruct"),
        dtype=recipe.get("dtype", "float32"),
        quantization_config=quantization,
    )
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        # Activation checkpointing is left to the trainer (transformers' Trainer turns it on under
        # its current name; TRL makes the inputs require grad): PEFT would call the deprecated
        # `gradient_checkpointing_enable`, which goes in transformers 6.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if prompts_only:  # held-out prompts are kept for evaluation, not scored while training
        trainer = trainer_class(model, args=args, train_dataset=train, processing_class=tokenizer)
    else:
        trainer = trainer_class(
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
    import json

    from align.data import save_preference_dataset
    from align.rewards.online import text_of

    trainer = build_trainer(recipe)
    output_dir = trainer.args.output_dir
    resume = recipe.get("resume", True)
    checkpoint = resume if isinstance(resume, str) else None
    if resume is True:
        checkpoint = last_checkpoint(output_dir)
    if checkpoint:
        from align.trainers.resume import check_checkpoint

        check_checkpoint(checkpoint, trainer)  # a damaged one: an error naming the file
    if checkpoint and trainer.is_world_process_zero():
        print(f"resuming from {checkpoint}")
    trainer.train(resume_from_checkpoint=checkpoint)
    final = trainer.save_final(Path(output_dir) / "final")
    if trainer.held_out_pairs is not None and trainer.is_world_process_zero():
        if getattr(trainer, "data_kind", "pairs") == "prompts":
            from align.io import atomic_file

            with atomic_file(Path(output_dir) / "held_out_prompts.jsonl") as path:
                rows = [{"prompt": text_of(p)} for p in trainer.held_out_pairs["prompt"]]
                path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:
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

        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")
        if not torch.cuda.is_available() and not deepspeed:
            # Launched as several processes on a machine without GPUs: without this, accelerate
            # gives every process a world of its own and they silently train alone. Not under
            # DeepSpeed (which joins the processes itself): ACCELERATE_USE_CPU would make
            # transformers build a plain multi-CPU Accelerator and drop DeepSpeed silently.
            os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    try:
        final = run_recipe(load_recipe(options.recipe, options.overrides))
    except user_error_types() as error:
        if debug_requested(options.debug):
            raise
        sys.exit(f"error: {describe(error)}")
    finally:
        leave_process_group()
    print(f"adapter saved to {final}")


if __name__ == "__main__":
    main()
