"""Datasets: the shipped prompt set and the multi-objective preference schema with its loaders."""

from align.data.loaders import (
    detect_layout,
    load_per_objective_pairs,
    load_pku_saferlhf,
    load_preference_data,
    load_schema,
    read_source,
    split_transcripts,
    train_test_split_pairs,
)
from align.data.prompts import load_prompt_dataset, load_prompts
from align.data.schema import (
    PREFERRED_PREFIX,
    TIE,
    load_jsonl,
    make_preference_dataset,
    objectives_of,
    preferred_column,
    save_preference_dataset,
    validate_preference_dataset,
)

__all__ = [
    "PREFERRED_PREFIX",
    "TIE",
    "detect_layout",
    "load_jsonl",
    "load_per_objective_pairs",
    "load_pku_saferlhf",
    "load_preference_data",
    "load_prompt_dataset",
    "load_prompts",
    "load_schema",
    "make_preference_dataset",
    "objectives_of",
    "preferred_column",
    "read_source",
    "save_preference_dataset",
    "split_transcripts",
    "train_test_split_pairs",
    "validate_preference_dataset",
]
