"""The models' forwards of one decoding step, and how their scores mix into the next token's.

:func:`plan_forwards` turns a :class:`~align.decoding.guidance.Guidance` into the
:class:`ModelForward` s a step runs — one per model, each with its own KV cache, each feeding one
or more :class:`ScoreTerm` s — and :func:`combine_scores` mixes their log-probs by α.
:class:`~align.decoding.batch.DecodingBatch` drives them: rows join (:meth:`ModelForward.extend`),
step, and leave (:meth:`ModelForward.keep`), each row with its own α.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import DynamicCache

from align.decoding.guidance import Guidance
from align.preference import Preference


class _CachedScorer:
    """A model with its own KV cache, returning next-token log-probs one step at a time."""

    def __init__(self, model: nn.Module, vocab_size: int):
        self.model = model
        self.vocab_size = vocab_size
        self.cache = DynamicCache()

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,  # a prompt's forward: no logits for every prompt position
        )
        self.cache = output.cache
        # Embedding tables may be padded past the tokenizer: those ids are never real tokens.
        log_probs = torch.log_softmax(output.logits[:, -1, : self.vocab_size].float(), dim=-1)
        # Finite floor: a coefficient of 0 times -inf would be NaN.
        return log_probs.clamp(min=-1e9)


@dataclass
class ScoreTerm:
    """One term of the mixed next-token score, ``coefficient · log-probs`` of one model: ``weight``
    maps rows of α ``(R, m)`` to their coefficients ``(R,)``, ``coefficient`` holds them per
    row of the batch ``(rows, 1)``; ``gate`` switches a shared-base PARM's adapter off (0) or on
    (1) for this term's rows; ``uses_alpha``: its scores depend on α during the prompt (PARM and
    policy rows), so one prompt's forward cannot serve several α."""

    weight: Callable[[torch.Tensor], torch.Tensor]
    gate: float | None = None
    uses_alpha: bool = False
    coefficient: torch.Tensor | None = None
    #: MOD's reference policy π_ref (f-divergence forms): its scores are not weighted by α.
    reference: bool = False


class ModelForward:
    """One model's batched forward each step: the model with its own KV cache, run on one
    stacked copy of the batch's rows per :class:`ScoreTerm` it feeds (only a shared-base PARM
    feeds two: base rows and PARM rows in one forward). ``set_alpha`` / ``set_gate`` steer a
    model that reads α (a PARM, a policy) before each forward."""

    def __init__(
        self,
        model: nn.Module,
        vocab_size: int,
        terms: list[ScoreTerm],
        set_alpha: Callable[[Preference], None] | None = None,
        set_gate: Callable[[torch.Tensor], None] | None = None,
    ):
        self.scorer = _CachedScorer(model, vocab_size)
        self.terms = terms
        self.set_alpha, self.set_gate = set_alpha, set_gate
        self.alpha: Preference | None = None  # per row, for a model that reads α
        #: Whether every row weights this model by 0 (an ARM or policy at α_j = 0): it skips
        #: its forwards, its cache falling ``lag`` columns behind (caught up if it is needed).
        self.idle = False
        self.lag = 0

    def _configure(self, terms: Sequence[ScoreTerm], rows: int, alpha: Preference | None) -> None:
        """Set the model's α (and row gate) for a forward over ``terms`` × ``rows`` rows."""
        if self.set_alpha is None or alpha is None or rows == 0:
            return
        same = bool((alpha.weights == alpha.weights[0]).all())
        # One α for every row takes the adapter's folded path (LoRA's per-token cost).
        self.set_alpha(
            alpha[0] if same else Preference(alpha.weights.repeat(len(terms), 1), alpha.objectives)
        )
        if terms[0].gate is not None and self.set_gate is not None:
            self.set_gate(torch.cat([torch.full((rows,), float(t.gate)) for t in terms]))

    def step(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor] | None:
        """Every term's next-token log-probs for one token per row (ids, mask, positions);
        None when the model is idle (weighted 0 on every row)."""
        if self.idle:
            self.lag += 1
            return None
        self._catch_up()
        copies = len(self.terms)
        if copies > 1:
            inputs = tuple(t.repeat(copies, 1) for t in inputs)
        return list(self.scorer(*inputs).chunk(copies))

    def keep(self, rows: torch.Tensor, active: int) -> None:
        """Keep only ``rows`` (indices into the ``active`` current rows): rows leave the batch
        and every stacked copy's cache."""
        if _cache_width(self.scorer.cache) is not None:
            index = torch.cat([rows + c * active for c in range(len(self.terms))])
            self.scorer.cache.batch_select_indices(index.to(self.scorer_device))
        for term in self.terms:
            term.coefficient = term.coefficient[rows.to(term.coefficient.device)]
        if self.alpha is not None:
            self.alpha = Preference(self.alpha.weights[rows.cpu()], self.alpha.objectives)
        self._configure(self.terms, len(rows), self.alpha)
        self._update_idle()

    def _update_idle(self) -> None:
        self.idle = not any(
            term.reference or bool(term.coefficient.ne(0).any()) for term in self.terms
        )

    def _catch_up(self) -> None:
        """Pad the cache of a model that sat idle with the columns it skipped (zeros: the
        rows they belong to weight this model by 0, so what it computes for them is unused)."""
        if self.lag and _cache_width(self.scorer.cache) is not None:
            for layer in self.scorer.cache.layers:
                layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, 0, self.lag))
                layer.values = torch.nn.functional.pad(layer.values, (0, 0, 0, self.lag))
        self.lag = 0

    def extend(
        self,
        inputs: tuple[torch.Tensor, ...],
        alpha: Preference,
        active: int,
        width: int,
        repeats: int = 1,
    ) -> None:
        """Add rows after the ``active`` current ones: read their left-padded prompts
        ``inputs`` (ids, mask, positions; possibly 0 columns wide) into a cache of their own and
        merge it into this model's cache, whose ``width`` columns the rows already have (the
        shorter of the two is padded on the left, those columns masked by the caller).

        ``repeats`` > 1 adds ``repeats`` rows per prompt, row ``k·P + i`` being prompt ``i`` at
        ``alpha`` row ``k·P + i``: a term whose prompt scores do not depend on α reads the
        prompts once and its cache is shared by the repeats."""
        prompts = inputs[0].shape[0]
        added = prompts * repeats
        device = inputs[0].device
        weights = alpha.to_tensor(torch.float32)
        for term in self.terms:
            new = term.weight(weights).to(device)[:, None]
            term.coefficient = (
                new if term.coefficient is None else torch.cat([term.coefficient, new])
            )
        self._catch_up()
        self._update_idle()
        prompt_cache = None
        if inputs[0].shape[1] and not self.idle:  # an idle model's cache rows stay zeros
            running = self.scorer.cache
            if repeats == 1:  # every term's rows in one stacked forward
                self._configure(self.terms, added, alpha)
                self.scorer.cache = DynamicCache()
                self.scorer(*(t.repeat(len(self.terms), 1) for t in inputs))
                prompt_cache = self.scorer.cache
            else:
                prompt_cache = _stack_caches(
                    [self._read_prompts(term, inputs, alpha, repeats) for term in self.terms]
                )
            self.scorer.cache = running
        self.scorer.cache = _merge_caches(
            self.scorer.cache if active else None,
            active,
            width,
            prompt_cache,
            added,
            len(self.terms),
        )
        if self.set_alpha is not None:
            self.alpha = (
                alpha
                if self.alpha is None or not active
                else Preference(torch.cat([self.alpha.weights, alpha.weights]), alpha.objectives)
            )
        self._configure(self.terms, active + added, self.alpha)
        self._update_idle()

    def _read_prompts(
        self, term: ScoreTerm, inputs: tuple[torch.Tensor, ...], alpha: Preference, repeats: int
    ) -> DynamicCache:
        """One term's cache of ``repeats`` × prompts rows (α-major): read once and tiled when
        the term's prompt scores do not depend on α."""
        prompts = inputs[0].shape[0]
        shared = not term.uses_alpha
        rows = prompts if shared else prompts * repeats
        self._configure([term], rows, Preference(alpha.weights[:rows], alpha.objectives))
        self.scorer.cache = DynamicCache()
        self.scorer(*(t if shared else t.repeat(repeats, 1) for t in inputs))
        if shared:
            tile = torch.arange(prompts, device=inputs[0].device).repeat(repeats)
            self.scorer.cache.batch_select_indices(tile.to(self.scorer_device))
        return self.scorer.cache

    def reset(self) -> None:
        """No rows: an empty cache, no coefficients."""
        self.scorer.cache = DynamicCache()
        for term in self.terms:
            term.coefficient = None
        self.alpha = None
        self.idle, self.lag = False, 0

    def trim(self, columns: int) -> None:
        """Drop the first ``columns`` cache columns (padding for every row still decoding)."""
        if columns and _cache_width(self.scorer.cache):
            for layer in self.scorer.cache.layers:
                layer.keys = layer.keys[..., columns:, :]
                layer.values = layer.values[..., columns:, :]

    @property
    def scorer_device(self) -> torch.device:
        return self.scorer.cache.layers[0].keys.device


def _cache_width(cache: DynamicCache | None) -> int | None:
    """The cached columns, or None for a cache holding nothing yet."""
    if cache is None or not cache.layers or not getattr(cache.layers[0], "is_initialized", False):
        return None
    return cache.layers[0].keys.shape[-2]


def _merge_caches(
    running: DynamicCache | None,
    active: int,
    width: int,
    added: DynamicCache | None,
    rows: int,
    copies: int,
) -> DynamicCache | None:
    """One cache of ``copies`` stacked blocks: each block the ``active`` running rows, then the
    ``rows`` added ones; the narrower side is left-padded with zeros (masked columns) to the
    wider one's width. ``running`` holds ``width`` columns (None: no rows, or none cached yet)."""
    if _cache_width(running) is None:
        running = None
    if _cache_width(added) is None:
        added = None
    if running is None and added is None:
        return None
    if running is None and width == 0:
        return added  # the first rows of a batch: their cache is the batch's
    template = running if running is not None else added
    total = max(width, _cache_width(added) or 0)

    def blocks(cache: DynamicCache | None, count: int, like: torch.Tensor, index: int, keys: bool):
        """``copies`` blocks of ``count`` rows, ``total`` columns wide."""
        if count == 0:
            return [like[:0]] * copies
        if cache is None:  # nothing cached for these rows: all padding
            return [like.new_zeros((count, like.shape[1], total, like.shape[3]))] * copies
        layer = cache.layers[index]
        tensor = layer.keys if keys else layer.values
        pad = total - tensor.shape[-2]
        if pad:
            tensor = torch.nn.functional.pad(tensor, (0, 0, pad, 0))
        return list(tensor.split(count))

    merged = DynamicCache()
    for index, layer in enumerate(template.layers):
        stacked = []
        for keys, like in ((True, layer.keys), (False, layer.values)):
            old = blocks(running, active, like, index, keys)
            new = blocks(added, rows, like, index, keys)
            stacked.append(torch.cat([t for c in range(copies) for t in (old[c], new[c])]))
        merged.update(stacked[0], stacked[1], index)
    return merged


def _stack_caches(caches: Sequence[DynamicCache]) -> DynamicCache:
    """One cache holding the rows of several, in order (their lengths agree: same prompts)."""
    if len(caches) == 1:
        return caches[0]
    stacked = DynamicCache()
    for index in range(len(caches[0].layers)):
        keys = torch.cat([c.layers[index].keys for c in caches])
        values = torch.cat([c.layers[index].values for c in caches])
        stacked.update(keys, values, index)
    return stacked


def _ones(alpha: torch.Tensor) -> torch.Tensor:
    return torch.ones(alpha.shape[0])


def _constant(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda alpha: torch.full((alpha.shape[0],), value)


def _column(index: int, scale: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda alpha: alpha[:, index] * scale


def plan_forwards(
    base: nn.Module | None, guidance: Guidance, vocab_size: int
) -> tuple[list[ModelForward], Callable[[], None]]:
    """The forwards each step needs, and a function restoring the guides' state afterwards.

    When the PARM is the base model plus its adapter (the same module object), base and PARM
    rows run as one batched forward with the adapter gated off on the base rows: the weights
    are read once per step, not twice. A β of ``inf`` drops the guide's forward altogether.
    """
    inverse_beta = 0.0 if guidance.beta == float("inf") else 1.0 / guidance.beta
    if guidance.mode in ("parm", "policy"):
        model = guidance.models[0]
        if guidance.set_preference is not None:
            set_alpha, set_gate = guidance.set_preference, None

            def restore() -> None:
                guidance.set_preference(None)

        else:
            from align.adapters import get_preference, preference_tuner, set_preference

            tuner = preference_tuner(model)
            previous = get_preference(model)

            def set_alpha(alpha: Preference) -> None:
                set_preference(model, alpha)

            set_gate = tuner.set_row_gate

            def restore() -> None:
                tuner.set_row_gate(None)
                set_preference(model, previous)

        steered = dict(set_alpha=set_alpha, set_gate=set_gate)
        if guidance.mode == "policy":
            forwards = [
                ModelForward(model, vocab_size, [ScoreTerm(_ones, uses_alpha=True)], **steered)
            ]
        else:
            guide = ScoreTerm(_constant(inverse_beta), uses_alpha=True)
            if base is not None and model.get_base_model() is base:
                terms = [ScoreTerm(_ones, gate=0.0)]
                terms += [replace(guide, gate=1.0)] if inverse_beta else []
                forwards = [ModelForward(model, vocab_size, terms, **steered)]
            else:
                forwards = [ModelForward(base, vocab_size, [ScoreTerm(_ones)])]
                if inverse_beta:
                    forwards.append(ModelForward(model, vocab_size, [guide], **steered))
        return forwards, restore

    if guidance.mode == "genarm":
        pairs = [(base, _ones)] + [
            (arm, _column(j, inverse_beta)) for j, arm in enumerate(guidance.models)
        ]
        if not inverse_beta:
            pairs = pairs[:1]
    else:
        pairs = [(policy, _column(j)) for j, policy in enumerate(guidance.models)]
    forwards = [ModelForward(model, vocab_size, [ScoreTerm(weight)]) for model, weight in pairs]
    if guidance.mode == "mod" and guidance.divergence != "reverse_kl":
        forwards.insert(0, ModelForward(base, vocab_size, [ScoreTerm(_ones, reference=True)]))
    return forwards, lambda: None


def combine_scores(
    guidance: Guidance, forwards: Sequence[ModelForward], outputs: Sequence
) -> torch.Tensor:
    """The next-token log-probs of one step from every model's (per term) log-probs."""
    if guidance.divergence == "reverse_kl":
        scores = 0
        for forward, log_probs in zip(forwards, outputs):
            if log_probs is None:  # idle: weighted 0 on every row
                continue
            for term, values in zip(forward.terms, log_probs):
                scores = scores + term.coefficient * values
        return torch.log_softmax(scores, dim=-1)  # the normaliser log Z
    from align.decoding.divergences import mix_policies

    reference, weights, policies = None, [], []
    for forward, log_probs in zip(forwards, outputs):
        if log_probs is None:  # idle: weighted 0 on every row
            continue
        for term, values in zip(forward.terms, log_probs):
            if term.reference:
                reference = values
            else:
                weights.append(term.coefficient[:, 0])
                policies.append(values)
    return mix_policies(
        torch.stack(policies, dim=1),
        torch.stack(weights, dim=1),
        reference,
        guidance.divergence,
        guidance.divergence_alpha,
    )
