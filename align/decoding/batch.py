"""The decoder: rows decoding together under one :class:`Guidance`, joining and leaving at any step.

:class:`DecodingBatch` is align's one token loop. Every guided decoder is a driver of it —
:func:`~align.decoding.guided.guided_generate` and ``guided_decode`` (a fixed batch of prompts),
:func:`~align.decoding.guided.guided_sweep` (the prompts at K α, their prompt forwards shared),
transformers' ``custom_generate`` entry, the sweep's passes, ``align generate`` and
``align serve`` (rows joining a running batch)::

    batch = DecodingBatch(base, guidance, vocab_size=len(tokenizer), pad_token_id=pad)
    batch.add(["a", "b"], [ids_a, ids_b], [[0.7, 0.3], [0.2, 0.8]],
              RowSettings(Sampler(temperature=0.7, generator=g), max_new_tokens=64,
                          eos_token_ids={eos}))
    while batch.unfinished:
        step = batch.advance()       # one token for every row, each row by its own sampler
        step.finished                # {key: tokens} of the rows that stopped at this step
        batch.add(...)               # new rows may join between any two steps

Each row has its own prompt, its own α, its own :class:`RowSettings` (sampler, token budget,
end-of-sequence ids, a stop callback) and its own place in every model's KV cache. A row joins
by reading its prompt but its last token into a cache of its own (one forward for all the rows
joining together; ``repeats`` rows per prompt share the forwards that do not depend on α); that
cache is merged into the running one, the narrower of the two left-padded with masked columns,
and the last prompt token goes through the next step with everyone else's token. Finished rows
leave (``drop_finished``: at once, or once they are that fraction of the batch, each departure
being one copy of every cache), taking their cache rows with them, and columns that became
padding for every row left are cut off. The formula, the models' grouping (a PARM on the shared
base runs base and PARM rows as one forward) and each row's α are the same whoever shares the
batch, so a row decodes the same tokens alone or among others.

:meth:`step` / :meth:`feed` are the loop's two halves for a caller that picks tokens itself.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from align.decoding.forwards import combine_scores, plan_forwards
from align.decoding.guidance import Guidance
from align.decoding.sampling import Sampler, choose_tokens
from align.preference import Preference, PreferenceLike


@dataclass(frozen=True)
class RowSettings:
    """How one row decodes: its ``sampler``, at most ``max_new_tokens`` tokens (None: no
    bound), ending at any of ``eos_token_ids`` (kept as the row's last token), or when
    ``on_token`` — told each token the row picks — returns True (``align serve``'s stop
    strings)."""

    sampler: Sampler = field(default_factory=Sampler)
    max_new_tokens: int | None = None
    eos_token_ids: Collection[int] = ()
    on_token: Callable[[int], bool] | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "eos_token_ids", frozenset(self.eos_token_ids))


@dataclass
class Step:
    """What one :meth:`DecodingBatch.advance` decoded: ``tokens[i]`` for row ``keys[i]`` (the
    rows still decoding, in batch order), and ``finished``: every token of each row that
    stopped at this step."""

    keys: list[Hashable]
    tokens: list[int]
    finished: dict[Hashable, list[int]]


class DecodingBatch:
    """Rows decoding together under one :class:`Guidance`, added and removed between steps.

    Rows are named by hashable ``keys``; :attr:`keys` lists them in batch order, the order of
    the rows of :meth:`step`'s scores and of :meth:`feed`'s tokens. ``logits_processor`` and
    ``stopping_criteria`` (transformers' lists, called with every row's prompt and tokens so
    far, left-padded with ``pad_token_id``) apply to all rows, before each row's sampler.
    """

    def __init__(
        self,
        base: nn.Module | None,
        guidance: Guidance,
        *,
        vocab_size: int,
        device: torch.device | str | None = None,
        pad_token_id: int = 0,
        logits_processor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        stopping_criteria: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        drop_finished: float | None = 0.0,
    ):
        if guidance.needs_base and base is None:
            what = "its reference policy" if guidance.mode == "mod" else "a base model"
            raise ValueError(
                f"{guidance.mode} guidance ({guidance.divergence}) needs {what}: "
                "pass the base model"
            )
        if drop_finished is not None and not 0 <= drop_finished <= 1:
            raise ValueError(f"drop_finished must be in [0, 1] or None, got {drop_finished}")
        self.guidance = guidance
        self.objectives = guidance.objectives
        self.vocab_size = vocab_size
        self.pad_token_id = pad_token_id
        self.logits_processor = logits_processor
        self.stopping_criteria = stopping_criteria
        self.drop_finished = drop_finished
        model = base if guidance.needs_base else guidance.models[0]
        self.device = torch.device(device) if device is not None else _device_of(model)
        self._forwards, self._restore = plan_forwards(
            base if guidance.needs_base else None, guidance, vocab_size
        )
        self.keys: list[Hashable] = []
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self._positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self._pending: torch.Tensor | None = torch.zeros(0, dtype=torch.long, device=self.device)
        self._settings: dict[Hashable, RowSettings] = {}
        self._tokens: dict[Hashable, list[int]] = {}
        self._done: set[Hashable] = set()  # finished, not yet left: fed padding meanwhile
        # Prompt and tokens of every row, for the batch-wide processors and criteria only.
        self._track = logits_processor is not None or stopping_criteria is not None
        self._sequences = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self._closed = False

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def unfinished(self) -> int:
        """Rows still decoding (finished rows may wait in the batch for others to finish)."""
        return len(self.keys) - len(self._done)

    @property
    def width(self) -> int:
        """Cached columns: the longest row in the batch (prompt and tokens so far)."""
        return self._mask.shape[1]

    @torch.no_grad()
    def add(
        self,
        keys: Sequence[Hashable],
        prompts: Sequence[Sequence[int] | torch.Tensor],
        preference: PreferenceLike,
        settings: RowSettings | Sequence[RowSettings] | None = None,
        *,
        repeats: int = 1,
    ) -> None:
        """Rows join: ``prompts`` (token ids, at least one each) at the rows of ``preference``
        (one α for all, or one per row) under ``keys``, decoding as ``settings`` say (one for
        all rows or one per row; default greedy, no bound: :meth:`step` / :meth:`feed` users).

        ``repeats`` > 1 answers every prompt that many times: row ``k·P + i`` (key
        ``keys[k·P + i]``) is prompt ``i`` at preference row ``k·P + i`` — e.g. one α of a
        sweep per block of P rows. Each model whose prompt scores do not depend on α (the
        base, GenARM's ARMs, MOD's policies) reads the prompts once for all the repeats."""
        self._check_open()
        if self._pending is None:
            raise RuntimeError("feed() the tokens chosen at the last step before adding rows")
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
        keys, prompts = list(keys), [torch.as_tensor(p, dtype=torch.long) for p in prompts]
        rows = len(prompts) * repeats
        if len(keys) != rows:
            raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts × {repeats} repeats")
        if not keys:
            return
        if len(set(keys)) != len(keys) or set(self.keys) & set(keys):
            raise ValueError(f"row keys must be new and unique, got {keys} (decoding: {self.keys})")
        for key, prompt in zip(keys, prompts):
            if prompt.ndim != 1 or not len(prompt):
                raise ValueError(f"row {key!r}: a prompt is a non-empty list of token ids")
            if int(prompt.min()) < 0 or int(prompt.max()) >= self.vocab_size:
                raise ValueError(f"row {key!r}: token ids must be in [0, {self.vocab_size})")
        if settings is None or isinstance(settings, RowSettings):
            settings = [settings or RowSettings()] * rows
        if len(settings) != rows:
            raise ValueError(f"{len(settings)} row settings for {rows} rows")
        alpha = Preference.coerce(preference, self.objectives).expand(rows)
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
            forward.extend((ids, mask, positions), alpha, active, width, repeats)
        total = max(width, columns)
        self._mask = torch.cat(
            [_pad_left(self._mask, total), _pad_left(mask, total).repeat(repeats, 1)]
        )
        lengths = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        self._positions = torch.cat([self._positions, lengths.repeat(repeats)])
        last = torch.stack([p[-1] for p in prompts]).to(self.device)
        self._pending = torch.cat([self._pending, last.repeat(repeats)])
        self.keys += keys
        for key, setting in zip(keys, settings):
            self._settings[key], self._tokens[key] = setting, []
        if self._track:
            longest = max(self._sequences.shape[1], max(len(p) for p in prompts))
            padded = torch.stack(
                [_pad_left(p[None], longest, self.pad_token_id)[0] for p in prompts]
            )
            self._sequences = torch.cat(
                [
                    _pad_left(self._sequences, longest, self.pad_token_id),
                    padded.to(self.device).repeat(repeats, 1),
                ]
            )

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
        if self._track:
            self._sequences = torch.cat([self._sequences, tokens[:, None]], dim=-1)

    @torch.no_grad()
    def advance(self) -> Step:
        """One token for every row still decoding, each picked by its row's sampler; rows that
        reach an end-of-sequence id, their token budget, a stopping criterion or their
        ``on_token``'s True finish (and leave, as ``drop_finished`` says)."""
        if not self.unfinished:
            raise RuntimeError("no rows to decode: add() some first")
        scores = self.step()
        if self.logits_processor is not None:
            scores = self.logits_processor(self._sequences, scores)
        keys = list(self.keys)
        tokens = choose_tokens(scores, [self._settings[key].sampler for key in keys])
        if self._done:
            waiting = torch.tensor([key in self._done for key in keys], device=self.device)
            tokens = torch.where(waiting, torch.full_like(tokens, self.pad_token_id), tokens)
        self.feed(tokens)
        stopped = None
        if self.stopping_criteria is not None:
            stopped = self.stopping_criteria(self._sequences, scores).tolist()
        step = Step([], [], {})
        for row, (key, token) in enumerate(zip(keys, tokens.tolist())):
            if key in self._done:
                continue
            settings, decoded = self._settings[key], self._tokens[key]
            decoded.append(token)
            step.keys.append(key)
            step.tokens.append(token)
            told = settings.on_token is not None and settings.on_token(token)
            if (
                token in settings.eos_token_ids
                or len(decoded) == settings.max_new_tokens
                or (stopped is not None and stopped[row])
                or told
            ):
                step.finished[key] = decoded
                self._done.add(key)
        done = len(self._done)
        if done and (
            done == len(self.keys)
            or (self.drop_finished is not None and done >= self.drop_finished * len(self.keys))
        ):
            self.remove(list(self._done))
        return step

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
        for key in leaving:
            self._settings.pop(key)
            self._tokens.pop(key)
        self._done -= leaving
        kept = [i for i, key in enumerate(self.keys) if key not in leaving]
        if not kept:
            for forward in self._forwards:
                forward.reset()
            self.keys = []
            self._mask = self._mask[:0, :0]
            self._positions = self._positions[:0]
            self._pending = None if self._pending is None else self._pending[:0]
            self._sequences = self._sequences[:0, :0]
            return
        index = torch.tensor(kept, device=self.device)
        active = len(self.keys)
        for forward in self._forwards:
            forward.keep(index, active)
        self.keys = [self.keys[i] for i in kept]
        self._mask, self._positions = self._mask[index], self._positions[index]
        if self._pending is not None:
            self._pending = self._pending[index]
        if self._track:
            self._sequences = self._sequences[index]
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


def _pad_left(tensor: torch.Tensor, width: int, value: int = 0) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (width - tensor.shape[1], 0), value=value)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
