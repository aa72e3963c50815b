"""How rows pick their next token from the guided log-probs: the one sampler of the decoder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def sampling_processors(
    do_sample: bool, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> LogitsProcessorList:
    """Transformers' own warpers for temperature, top-k and top-p."""
    processors = LogitsProcessorList()
    if not do_sample:
        return processors
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return processors


@dataclass
class Sampler:
    """How one row picks its tokens: ``temperature`` 0 is greedy; else sampling with top-p /
    top-k, from the row's own ``generator`` (a seeded row samples the same tokens whatever
    shares its batch) or, without one, torch's global generator."""

    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # NaN too
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        self.processors = (
            sampling_processors(True, self.temperature, self.top_k, self.top_p)
            if self.temperature > 0
            else None
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def settings(self) -> tuple:
        return self.temperature, self.top_p, self.top_k


def choose_tokens(scores: torch.Tensor, samplers: Sequence[Sampler]) -> torch.Tensor:
    """One token per row of ``scores`` (log-probs), row ``i`` picked as ``samplers[i]`` says.

    Rows with their own generator draw alone (their draws do not depend on the other rows);
    rows without one and with the same settings draw together, from torch's generator."""
    if len(samplers) != scores.shape[0]:
        raise ValueError(f"{len(samplers)} samplers for {scores.shape[0]} rows")
    tokens = scores.argmax(dim=-1)
    shared: dict[tuple, list[int]] = {}
    for row, sampler in enumerate(samplers):
        if sampler.greedy:
            continue
        if sampler.generator is None:
            shared.setdefault(sampler.settings, []).append(row)
            continue
        tokens[row] = _draw(scores[row : row + 1], sampler, sampler.generator)[0]
    for rows in shared.values():
        index = torch.tensor(rows, device=scores.device)
        tokens[index] = _draw(scores[index], samplers[rows[0]], None)
    return tokens


def _draw(scores: torch.Tensor, sampler: Sampler, generator: torch.Generator | None):
    probs = torch.softmax(sampler.processors(None, scores), dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(scores.device)
