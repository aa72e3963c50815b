"""The prompt set shipped with align (written for this project; see resources/prompts.jsonl)."""

from __future__ import annotations

import json
from importlib import resources


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
