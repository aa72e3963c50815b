"""Decoding: plain batched generation (and, later, reward-guided decoding)."""

from align.decoding.plain import generate_responses

__all__ = ["generate_responses"]
