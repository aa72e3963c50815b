"""Tokenized multi-objective preference pairs and their collator.

A training example is one prompt with two responses and, per objective, which response that
objective prefers (0, 1, or -1 for a tie). Both responses are scored in one forward: the batch
is laid out as TRL's preference collator lays it out, ``[response_0 rows; response_1 rows]``,
each row ``prompt + response`` right-padded, with a ``completion_mask`` over the response tokens.
So a one-objective batch whose labels all say 0 is exactly TRL's ``[chosen; rejected]`` batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset

from align.data.schema import TIE, preferred_column, validate_preference_dataset
from align.rewards.arm import tokenize_prompt, tokenize_response

TOKENIZED_COLUMNS = ("prompt_ids", "response_0_ids", "response_1_ids", "preferred")


def select_objectives(dataset: Dataset, objectives: Sequence[str] | None) -> tuple[str, ...]:
    """The objectives to train on: all of the dataset's (in its order) or the named subset,
    each of which must be in the dataset."""
    available = validate_preference_dataset(dataset)
    if objectives is None:
        return available
    missing = [name for name in objectives if name not in available]
    if missing:
        raise ValueError(
            f"objectives {missing} are not in the dataset, whose objectives are {list(available)}"
        )
    return tuple(objectives)


def tokenize_preference_dataset(
    dataset: Dataset,
    tokenizer: Any,
    objectives: Sequence[str],
    *,
    max_length: int = 1024,
    max_prompt_length: int = 256,
    chat_template: bool = True,
    num_proc: int | None = None,
) -> Dataset:
    """Add token ids and the ``preferred`` label vector; drop pairs every objective calls a tie.

    The chat template is applied to the prompt when the tokenizer has one. Prompts keep their
    last ``max_prompt_length`` tokens; responses are cut so the row fits ``max_length``.
    """
    if max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be smaller than max_length "
            f"({max_length}) to leave room for the response"
        )
    label_columns = [preferred_column(name) for name in objectives]

    def tokenize(example: dict[str, Any]) -> dict[str, Any]:
        prompt_ids = tokenize_prompt(
            tokenizer,
            example["prompt"],
            max_prompt_length=max_prompt_length,
            chat_template=chat_template,
        )
        room = max_length - len(prompt_ids)
        return {
            "prompt_ids": prompt_ids,
            "response_0_ids": tokenize_response(tokenizer, example["response_0"], room),
            "response_1_ids": tokenize_response(tokenizer, example["response_1"], room),
            "preferred": [int(example[column]) for column in label_columns],
        }

    tokenized = dataset.map(
        tokenize, num_proc=num_proc, desc="Tokenizing preference pairs", load_from_cache_file=False
    )
    decided = tokenized.filter(
        lambda example: any(label != TIE for label in example["preferred"]),
        desc="Dropping pairs tied on every objective",
        load_from_cache_file=False,
    )
    if len(decided) == 0:
        raise ValueError(
            f"every pair in the dataset is a tie on {list(objectives)}: nothing to learn from"
        )
    return decided


@dataclass
class MultiObjectivePreferenceCollator:
    """Pads a list of tokenized pairs into one batch of ``2B`` rows plus ``preferred (B, m)``."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows, masks = [], []
        for key in ("response_0_ids", "response_1_ids"):
            for example in examples:
                rows.append(list(example["prompt_ids"]) + list(example[key]))
                masks.append([0] * len(example["prompt_ids"]) + [1] * len(example[key]))
        width = max(len(row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return {
            "input_ids": torch.tensor([r + [self.pad_token_id] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "completion_mask": torch.tensor([m + [0] * (width - len(m)) for m in masks]),
            "preferred": torch.tensor([list(example["preferred"]) for example in examples]),
        }
