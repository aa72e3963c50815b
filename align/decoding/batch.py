"""Continuous batching for guided decoding: rows join and leave between decoding steps.

:class:`DecodingBatch` holds the rows decoding together — each with its own prompt, its own α
and its own place in every model's KV cache — and runs the models of a :class:`Guidance`
(PARM, GenARM, MOD or a preference-adapter policy) one token at a time on all of them::

    batch = DecodingBatch(base, guidance, vocab_size=len(tokenizer))
    batch.add(["a"], [prompt_ids], [[0.7, 0.3]])
    while len(batch):
        scores = batch.step()                     # (rows, vocab) guided log-probs
        tokens = choose_tokens(scores, samplers)  # one per row, each row its own settings
        batch.feed(tokens)                        # fed to the models at the next step
        batch.remove(finished_keys)               # rows that are done leave ...
        batch.add(new_keys, new_prompts, alphas)  # ... and new ones join, at any step

A row joins by reading its prompt but its last token into a cache of its own (one forward for
all the rows joining together); that cache is merged into the running one, the narrower of the
two left-padded with masked columns, and the last prompt token goes through the next step with
everyone else's token. A row leaving takes its cache rows with it, and columns that became
padding for every row left are cut off, so the cache stays as wide as the longest row still
decoding. The formula, the models' grouping (a PARM on the shared base runs base and PARM rows
as one forward) and the per-row α are those of :func:`align.decoding.guided.guided_decode`
(the same ``plan_forwards``, ``ModelForward`` and ``combine_scores``): a row decodes the same
tokens whoever shares its batch.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from align.decoding.guided import Guidance, combine_scores, plan_forwards, sampling_processors
from align.preference import Preference, PreferenceLike


class DecodingBatch:
    """Rows decoding together under one :class:`Guidance`, added and removed between steps.

    Rows are named by hashable ``keys``; :attr:`keys` lists them in batch order, the order of
    the rows of :meth:`step`'s scores and of :meth:`feed`'s tokens.
    """

    def __init__(
        self,
        base: nn.Module | None,
        guidance: Guidance,
        *,
        vocab_size: int,
        device: torch.device | str | None = None,
    ):
        if guidance.needs_base and base is None:
            raise ValueError(f"{guidance.mode} guidance needs a base model")
        self.guidance = guidance
        self.objectives = guidance.objectives
        self.vocab_size = vocab_size
        model = base if guidance.needs_base else guidance.models[0]
        self.device = torch.device(device) if device is not None else _device_of(model)
        self._forwards, self._restore = plan_forwards(
            base if guidance.needs_base else None, guidance, None, vocab_size
        )
        self.keys: list[Hashable] = []
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self._positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self._pending: torch.Tensor | None = torch.zeros(0, dtype=torch.long, device=self.device)
        self._closed = False

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def width(self) -> int:
        """Cached columns: the longest row still decoding (prompt and tokens so far)."""
        return self._mask.shape[1]

    @torch.no_grad()
    def add(
        self,
        keys: Sequence[Hashable],
        prompts: Sequence[Sequence[int] | torch.Tensor],
        preference: PreferenceLike,
    ) -> None:
        """Rows join: ``prompts[i]`` (token ids, at least one) at preference row ``i`` (one α
        for all, or one per row) under ``keys[i]``."""
        self._check_open()
        if self._pending is None:
            raise RuntimeError("feed() the tokens chosen at the last step before adding rows")
        keys, prompts = list(keys), [torch.as_tensor(p, dtype=torch.long) for p in prompts]
        if len(keys) != len(prompts):
            raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
        if not keys:
            return
        taken = set(self.keys)
        if len(set(keys)) != len(keys) or taken & set(keys):
            raise ValueError(f"row keys must be new and unique, got {keys} (decoding: {self.keys})")
        for key, prompt in zip(keys, prompts):
            if prompt.ndim != 1 or not len(prompt):
                raise ValueError(f"row {key!r}: a prompt is a non-empty list of token ids")
            if int(prompt.min()) < 0 or int(prompt.max()) >= self.vocab_size:
                raise ValueError(f"row {key!r}: token ids must be in [0, {self.vocab_size})")
        alpha = Preference.coerce(preference, self.objectives).expand(len(prompts))
        # Every prompt but its last token, left-padded: the last token joins the next step.
        heads = [p[:-1] for p in prompts]
        columns = max(len(h) for h in heads)
        ids = torch.zeros((len(heads), columns), dtype=torch.long)
        mask = torch.zeros((len(heads), columns), dtype=torch.long)
        for row, head in enumerate(heads):
            if len(head):
                ids[row, columns - len(head) :] = head
                mask[row, columns - len(head) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        active, width = len(self.keys), self.width
        for forward in self._forwards:
            forward.extend((ids, mask, positions), alpha, active, width)
        total = max(width, columns)
        self._mask = torch.cat([_pad_left(self._mask, total), _pad_left(mask, total)])
        lengths = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        self._positions = torch.cat([self._positions, lengths])
        last = torch.stack([p[-1] for p in prompts]).to(self.device)
        self._pending = torch.cat([self._pending, last])
        self.keys += keys

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One forward of every model on every row's next token: the guided next-token
        log-probs ``(len(self), vocab_size)``, rows in :attr:`keys` order."""
        self._check_open()
        if not self.keys:
            raise RuntimeError("no rows to decode: add() some first")
        if self._pending is None:
            raise RuntimeError("feed() the tokens chosen at the last step before the next step")
        column = torch.ones((len(self.keys), 1), dtype=self._mask.dtype, device=self.device)
        mask = torch.cat([self._mask, column], dim=-1)
        inputs = (self._pending[:, None], mask, self._positions[:, None])
        outputs = [forward.step(inputs) for forward in self._forwards]
        self._mask, self._positions, self._pending = mask, self._positions + 1, None
        return combine_scores(self.guidance, self._forwards, outputs)

    def feed(self, tokens: torch.Tensor | Sequence[int]) -> None:
        """The token chosen for each row (in :attr:`keys` order) at the last step."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device).reshape(-1)
        if self._pending is not None:
            raise RuntimeError("feed() follows step(): one token per row per step")
        if len(tokens) != len(self.keys):
            raise ValueError(f"{len(tokens)} tokens for {len(self.keys)} rows")
        self._pending = tokens

    @torch.no_grad()
    def remove(self, keys: Sequence[Hashable]) -> None:
        """Rows leave (unknown keys are an error); the others decode on unchanged."""
        self._check_open()
        leaving = set(keys)
        unknown = leaving - set(self.keys)
        if unknown:
            raise KeyError(f"no rows {sorted(unknown, key=repr)} in the batch")
        if not leaving:
            return
        kept = [i for i, key in enumerate(self.keys) if key not in leaving]
        if not kept:
            for forward in self._forwards:
                forward.reset()
            self.keys = []
            self._mask = self._mask[:0, :0]
            self._positions = self._positions[:0]
            self._pending = None if self._pending is None else self._pending[:0]
            return
        index = torch.tensor(kept, device=self.device)
        active = len(self.keys)
        for forward in self._forwards:
            forward.keep(index, active)
        self.keys = [self.keys[i] for i in kept]
        self._mask, self._positions = self._mask[index], self._positions[index]
        if self._pending is not None:
            self._pending = self._pending[index]
        # Columns that are padding for every row left: cut them off every cache.
        used = self._mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else self.width
        if first:
            for forward in self._forwards:
                forward.trim(first)
            self._mask = self._mask[:, first:]

    def close(self) -> None:
        """Give the guides back as they were (α, row gates): the batch cannot be used after."""
        if not self._closed:
            self._restore()
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this DecodingBatch is closed")

    def __enter__(self) -> DecodingBatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class Sampler:
    """How one row picks its tokens: ``temperature`` 0 is greedy; else sampling with top-p /
    top-k, from the row's own ``generator`` (a seeded row samples the same tokens whatever
    shares its batch)."""

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
        self._processors = (
            sampling_processors(True, self.temperature, self.top_k, self.top_p)
            if self.temperature > 0
            else None
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def choose_tokens(scores: torch.Tensor, samplers: Sequence[Sampler]) -> torch.Tensor:
    """One token per row of ``scores`` (log-probs), row ``i`` picked as ``samplers[i]`` says."""
    if len(samplers) != scores.shape[0]:
        raise ValueError(f"{len(samplers)} samplers for {scores.shape[0]} rows")
    tokens = scores.argmax(dim=-1)
    for row, sampler in enumerate(samplers):
        if sampler.greedy:
            continue
        warped = sampler._processors(None, scores[row : row + 1])
        probs = torch.softmax(warped, dim=-1)
        generator = sampler.generator
        if generator is not None and generator.device != probs.device:
            probs = probs.to(generator.device)
        tokens[row] = torch.multinomial(probs, 1, generator=generator).item()
    return tokens
