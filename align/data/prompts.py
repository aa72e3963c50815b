"""The prompt set shipped with align (written for this project; see resources/prompts.jsonl)."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from datasets import Dataset

from align.errors import BadFileError
from align.files import read_text


def load_prompts(limit: int | None = None, categories: list[str] | None = None) -> list[dict]:
    """Shipped prompts as ``{"id", "category", "prompt"}`` records, in file order.

    The file interleaves categories, so any prefix is a mix of them.
    """
    text = resources.files("align").joinpath("resources/prompts.jsonl").read_text(encoding="utf-8")
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if categories is not None:
        known = {record["category"] for record in records}
        unknown = sorted(set(categories) - known)
        if unknown:
            raise ValueError(f"unknown prompt categories {unknown}; known: {sorted(known)}")
        records = [record for record in records if record["category"] in categories]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        records = records[:limit]
    return records


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one per line) or a ``.jsonl`` file (a ``prompt`` per line)."""
    path = Path(path)
    lines = read_text(path).splitlines()
    if not any(line.strip() for line in lines):
        raise BadFileError(path, "empty file (no prompts)")
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise BadFileError(
                path, f"not valid JSON Lines ({error.msg}: line {number}, column {error.colno})"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise BadFileError(path, f"line {number}: expected a JSON object with a 'prompt'")
        texts.append(record["prompt"])
    return texts


def load_prompt_dataset(
    source: Any = "shipped", *, limit: int | None = None, chat: bool = True
) -> Dataset:
    """Prompts for online RL as a ``datasets.Dataset`` with one ``prompt`` column.

    ``source``: ``"shipped"`` (align's prompt set), a file (JSONL / JSON / CSV / Parquet) or a
    Dataset with a ``prompt`` column — a preference dataset works too (its distinct prompts, in
    order). ``chat``: each prompt as a one-message conversation, so TRL applies the model's chat
    template; else the raw text.
    """
    from align.data.loaders import read_source

    if isinstance(source, str) and source == "shipped":
        texts = [record["prompt"] for record in load_prompts()]
    else:
        dataset = read_source(source)
        if "prompt" not in dataset.column_names:
            raise ValueError(
                f"{source}: prompts need a 'prompt' column; found {dataset.column_names}"
            )
        texts = []
        for index, text in enumerate(dataset["prompt"]):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{source}: prompt {index} is not a non-empty string: {text!r}")
            texts.append(text)
        texts = list(dict.fromkeys(texts))
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        texts = texts[:limit]
    if not texts:
        raise ValueError(f"{source}: no prompts")
    rows = [[{"role": "user", "content": text}] for text in texts] if chat else texts
    return Dataset.from_dict({"prompt": rows})
