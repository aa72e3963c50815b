"""Datasets: the shipped prompt set (and, later, the multi-objective preference schema)."""

from align.data.prompts import load_prompts

__all__ = ["load_prompts"]
