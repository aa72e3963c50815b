"""Tokenized multi-objective preference pairs and their collator.

A training example is one prompt with two responses and, per objective, which response that
objective prefers (0, 1, or -1 for a tie). Both responses are scored in one forward: the batch
is laid out as TRL's preference collator lays it out, ``[response_0 rows; response_1 rows]``,
each row ``prompt + response`` right-padded, with a ``completion_mask`` over the response tokens.
So a one-objective batch whose labels all say 0 is exactly TRL's ``[chosen; rejected]`` batch.

The same pairs also come split at the prompt, for scoring with the prompt read once per pair
(``share_prompt``): ``prefix_ids`` (B rows: every prompt token but the last, left-padded, so all
prompts end on the same column) and ``continuation_ids`` (2B rows: the prompt's last token, then
the response, right-padded). The prompt's KV cache serves both responses of its pair.
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
        rows, masks, continuations = [], [], []
        for key in ("response_0_ids", "response_1_ids"):
            for example in examples:
                prompt, response = list(example["prompt_ids"]), list(example[key])
                rows.append(prompt + response)
                masks.append([0] * len(prompt) + [1] * len(response))
                continuations.append(prompt[-1:] + response)
        prefixes = [list(example["prompt_ids"])[:-1] for example in examples]
        batch = {
            **self._right_padded(rows, masks, ("input_ids", "attention_mask", "completion_mask")),
            "preferred": torch.tensor([list(example["preferred"]) for example in examples]),
        }
        width = self._width(prefixes)
        pad = self.pad_token_id
        batch["prefix_ids"] = torch.tensor(
            [[pad] * (width - len(p)) + p for p in prefixes], dtype=torch.long
        )
        batch["prefix_mask"] = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prefixes], dtype=torch.long
        )
        # The continuation's first token is the prompt's last: its output scores the response's
        # first token, so the labels are the response tokens alone.
        labels = [[0] + [1] * (len(c) - 1) for c in continuations]
        names = ("continuation_ids", "continuation_mask", "continuation_completion_mask")
        batch.update(self._right_padded(continuations, labels, names))
        return batch

    def _width(self, rows: list[list[int]]) -> int:
        width = max(len(row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return width

    def _right_padded(self, rows, masks, names) -> dict[str, torch.Tensor]:
        width = self._width(rows)
        ids, attention, completion = names
        return {
            ids: torch.tensor([r + [self.pad_token_id] * (width - len(r)) for r in rows]),
            attention: torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            completion: torch.tensor([m + [0] * (width - len(m)) for m in masks]),
        }
