"""Reward-guided decoding: a frozen base steered token by token by preference-conditioned rewards.

At every step each model scores the next token and the scores are mixed per row::

    PARM:    log π(y|·) = log π_base + (1/β) · log π_PARM(y | ·, α)          (α injected into PARM)
    GenARM:  log π(y|·) = log π_base + (1/β) · Σ_j α_j · log π_ARM_j
    MOD:     log π(y|·) = Σ_j α_j · log π_j                                   (m policies, no base)
    policy:  log π(y|·) = log π_policy(y | ·, α)         (one policy with a preference adapter)

then renormalised. MOD's other f-divergence forms (forward KL, Jensen-Shannon, α-divergences)
mix the policies' probabilities through the base as the reference policy π_ref, with a normaliser
solved for at every step (:mod:`align.decoding.divergences`). All prompts of a batch decode together (left padding), each row may carry its
own α, and every model keeps its own KV cache advanced one token at a time — the reference
implementations decode one prompt at a time, which :mod:`evaluation.benchmarks.guided_decoding`
measures against. :class:`align.decoding.batch.DecodingBatch` runs the same models and formula
step by step on rows that join and leave between steps (continuous batching, ``align serve``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn
from transformers import DynamicCache, LogitsProcessorList
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from align.preference import Preference, PreferenceLike

Mode = Literal["parm", "genarm", "mod", "policy"]
MODES = ("parm", "genarm", "mod", "policy")


@dataclass
class Guidance:
    """Which models guide the base, and how their scores are weighted by α.

    Build one with :func:`parm_guidance`, :func:`genarm_guidance`, :func:`mod_guidance` or
    :func:`policy_guidance`.
    """

    mode: Mode
    models: list[nn.Module]
    objectives: tuple[str, ...]
    beta: float = 1.0
    tokenizers: list[Any] = field(default_factory=list)
    #: MOD only: the f-divergence whose closed form mixes the policies, and an α-divergence's
    #: order (see :mod:`align.decoding.divergences`).
    divergence: str = "reverse_kl"
    divergence_alpha: float | None = None

    def __post_init__(self) -> None:
        from align.decoding.divergences import check_divergence

        if self.mode not in MODES:
            raise ValueError(f"guidance mode must be one of {MODES}, got {self.mode!r}")
        self.divergence_alpha = check_divergence(self.divergence, self.divergence_alpha)
        if self.mode != "mod" and self.divergence != "reverse_kl":
            raise ValueError(
                f"divergence {self.divergence!r} is a form of MOD; {self.mode} guidance adds "
                "log-probs (reverse_kl)"
            )
        if not self.beta > 0:  # also rejects NaN; inf means no guidance
            raise ValueError(f"beta must be > 0 (or inf for no guidance), got {self.beta}")
        expected = 1 if self.mode in ("parm", "policy") else len(self.objectives)
        if len(self.models) != expected:
            raise ValueError(
                f"{self.mode} guidance needs {expected} model(s), got {len(self.models)}"
            )

    @property
    def needs_base(self) -> bool:
        """Whether decoding needs the base model: as the model guided (PARM, GenARM), or as
        MOD's reference policy (every form but the reverse KL, where π_ref cancels); a policy
        decodes alone."""
        return self.mode in ("parm", "genarm") or (
            self.mode == "mod" and self.divergence != "reverse_kl"
        )


def parm_guidance(arm: nn.Module, beta: float = 1.0, tokenizer: Any = None) -> Guidance:
    """One PARM (an ARM with a preference adapter); α is injected into it."""
    from align.adapters import objectives_of

    return Guidance(
        "parm", [arm], objectives_of(arm), beta, [tokenizer] if tokenizer is not None else []
    )


def genarm_guidance(
    arms: Mapping[str, nn.Module], beta: float = 1.0, tokenizers: Sequence[Any] = ()
) -> Guidance:
    """One ARM per objective, ``{"helpful": arm_1, "harmless": arm_2}``; weighted by α_j / β."""
    return Guidance("genarm", list(arms.values()), tuple(arms), beta, list(tokenizers))


def mod_guidance(
    policies: Mapping[str, nn.Module],
    tokenizers: Sequence[Any] = (),
    divergence: str = "reverse_kl",
    divergence_alpha: float | None = None,
) -> Guidance:
    """MOD: one aligned policy per objective, mixed with weights α. ``divergence``: the
    f-divergence the policies were regularised with — ``reverse_kl`` (log-probs mixed linearly,
    no base), ``forward_kl``, ``jensen_shannon`` or ``alpha`` (order ``divergence_alpha`` > 0);
    every form but ``reverse_kl`` takes the base model passed to the decoder as π_ref."""
    return Guidance(
        "mod",
        list(policies.values()),
        tuple(policies),
        1.0,
        list(tokenizers),
        divergence=divergence,
        divergence_alpha=divergence_alpha,
    )


def policy_guidance(policy: nn.Module, tokenizer: Any = None) -> Guidance:
    """A policy with a preference adapter (SVD-LoRA / PBLoRA) decoding on its own, α injected
    per row: plain decoding, with each row at its own α."""
    from align.adapters import objectives_of

    return Guidance(
        "policy", [policy], objectives_of(policy), 1.0, [tokenizer] if tokenizer is not None else []
    )


# --- tokenizer agreement -------------------------------------------------------------------


def check_same_tokenizer(base_tokenizer: Any, other: Any, other_name: str = "the ARM") -> None:
    """Base and guiding models must share the tokenizer: token i must mean the same thing."""
    base_vocab, other_vocab = base_tokenizer.get_vocab(), other.get_vocab()
    problems = []
    if len(base_vocab) != len(other_vocab):
        problems.append(f"vocabulary sizes differ ({len(base_vocab)} vs {len(other_vocab)})")
    differing = sorted(
        (token for token, index in base_vocab.items() if other_vocab.get(token) != index),
        key=base_vocab.get,
    )
    if differing:
        examples = ", ".join(
            f"{t!r}: {base_vocab[t]} vs {other_vocab.get(t)}" for t in differing[:3]
        )
        problems.append(f"{len(differing)} tokens map to different ids (e.g. {examples})")
    for special in ("eos_token_id", "pad_token_id", "bos_token_id"):
        ours, theirs = getattr(base_tokenizer, special, None), getattr(other, special, None)
        if ours is not None and theirs is not None and ours != theirs:
            problems.append(f"{special} differs ({ours} vs {theirs})")
    if problems:
        raise ValueError(
            f"the base model and {other_name} do not share a tokenizer: "
            + "; ".join(problems)
            + ". Guided decoding adds per-token scores, so every model must use the same vocabulary."
        )


# --- the decoding loop ---------------------------------------------------------------------


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
            logits_to_keep=1,  # prefill: no logits for every prompt position
        )
        self.cache = output.cache
        # Embedding tables may be padded past the tokenizer: those ids are never real tokens.
        log_probs = torch.log_softmax(output.logits[:, -1, : self.vocab_size].float(), dim=-1)
        # Finite floor: a coefficient of 0 times -inf would be NaN.
        return log_probs.clamp(min=-1e9)


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
class ScoreTerm:
    """One term of the mixed next-token score, ``coefficient · log-probs`` of one model: ``weight``
    maps rows of α ``(R, m)`` to their coefficients ``(R,)``, ``coefficient`` holds them per
    active row; ``gate`` switches a shared-base PARM's adapter off (0) or on (1) for this term's
    rows; ``uses_alpha``: its scores depend on α during the prompt (PARM rows), so its prefill
    cannot be shared across α."""

    weight: Callable[[torch.Tensor], torch.Tensor]
    gate: float | None = None
    uses_alpha: bool = False
    coefficient: torch.Tensor | None = None
    #: MOD's reference policy π_ref (f-divergence forms): its scores are not weighted by α.
    reference: bool = False


class ModelForward:
    """One model's batched forward each step: the model with its own KV cache, run on one
    stacked copy of the active rows per :class:`ScoreTerm` it feeds (only a shared-base PARM
    feeds two: base rows and PARM rows in one forward)."""

    def __init__(self, model: nn.Module, vocab_size: int, terms: list[ScoreTerm], arm=None):
        self.scorer = _CachedScorer(model, vocab_size)
        self.terms = terms
        self.arm = arm  # the PARM whose α (and row gate) this forward sets, if any
        self.alpha: Preference | None = None  # per active row, for the PARM

    def _configure(self, terms: Sequence[ScoreTerm], rows: int, alpha: Preference | None) -> None:
        """Set the PARM's α and row gate for a forward over ``terms`` × ``rows`` rows."""
        if self.arm is None or alpha is None or rows == 0:
            return
        from align.adapters import preference_tuner, set_preference

        same = bool((alpha.weights == alpha.weights[0]).all())
        # One α for every row takes the adapter's folded path (LoRA's per-token cost).
        set_preference(
            self.arm,
            alpha[0] if same else Preference(alpha.weights.repeat(len(terms), 1), alpha.objectives),
        )
        if terms[0].gate is not None:
            gate = torch.cat([torch.full((rows,), float(t.gate)) for t in terms])
            preference_tuner(self.arm).set_row_gate(gate)

    def prefill(self, inputs: tuple[torch.Tensor, ...], repeats: int) -> list[torch.Tensor]:
        """Scores after the prompts, per term, for ``repeats`` × prompts rows (α-major). A term
        whose scores do not depend on α runs the prompts once and repeats the result."""
        prompts = inputs[0].shape[0]
        caches, outputs = [], []
        for term in self.terms:
            shared = repeats > 1 and not term.uses_alpha
            rows = prompts if shared else prompts * repeats
            alpha = (
                None
                if self.alpha is None
                else Preference(self.alpha.weights[:rows], self.alpha.objectives)
            )
            self._configure([term], rows, alpha)
            self.scorer.cache = DynamicCache()
            log_probs = self.scorer(*(t if shared else t.repeat(repeats, 1) for t in inputs))
            if shared:
                tile = torch.arange(prompts, device=log_probs.device).repeat(repeats)
                self.scorer.cache.batch_select_indices(tile)
                log_probs = log_probs[tile]
            caches.append(self.scorer.cache)
            outputs.append(log_probs)
        self.scorer.cache = caches[0] if len(caches) == 1 else _stack_caches(caches)
        self._configure(self.terms, prompts * repeats, self.alpha)
        return outputs

    def step(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        copies = len(self.terms)
        if copies > 1:
            inputs = tuple(t.repeat(copies, 1) for t in inputs)
        return list(self.scorer(*inputs).chunk(copies))

    def keep(self, rows: torch.Tensor, active: int) -> None:
        """Keep only ``rows`` (indices into the ``active`` current rows): finished rows leave
        the batch and every stacked copy's cache."""
        if _cache_width(self.scorer.cache) is not None:
            index = torch.cat([rows + c * active for c in range(len(self.terms))])
            self.scorer.cache.batch_select_indices(index.to(self.scorer_device))
        for term in self.terms:
            term.coefficient = term.coefficient[rows.to(term.coefficient.device)]
        if self.alpha is not None:
            self.alpha = Preference(self.alpha.weights[rows.cpu()], self.alpha.objectives)
        self._configure(self.terms, len(rows), self.alpha)

    def extend(
        self, inputs: tuple[torch.Tensor, ...], alpha: Preference, active: int, width: int
    ) -> None:
        """Add rows after the ``active`` current ones: read their left-padded prompts
        ``inputs`` (ids, mask, positions; possibly 0 columns wide) into a cache of their own
        and merge it into this model's cache, whose ``width`` columns the rows already have (the
        shorter of the two is padded on the left, those columns masked by the caller)."""
        added = inputs[0].shape[0]
        device = inputs[0].device
        weights = alpha.to_tensor(torch.float32)
        for term in self.terms:
            new = term.weight(weights).to(device)[:, None]
            term.coefficient = (
                new if term.coefficient is None else torch.cat([term.coefficient, new])
            )
        copies = len(self.terms)
        prompt_cache = None
        if inputs[0].shape[1]:
            self._configure(self.terms, added, alpha)
            running = self.scorer.cache
            self.scorer.cache = DynamicCache()
            self.scorer(*(t.repeat(copies, 1) for t in inputs))
            prompt_cache, self.scorer.cache = self.scorer.cache, running
        self.scorer.cache = _merge_caches(
            self.scorer.cache if active else None, active, width, prompt_cache, added, copies
        )
        if self.arm is not None:
            self.alpha = (
                alpha
                if self.alpha is None or not active
                else Preference(torch.cat([self.alpha.weights, alpha.weights]), alpha.objectives)
            )
        self._configure(self.terms, active + added, self.alpha)

    def reset(self) -> None:
        """No rows: an empty cache, no coefficients."""
        self.scorer.cache = DynamicCache()
        for term in self.terms:
            term.coefficient = None
        self.alpha = None

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
    base: nn.Module | None,
    guidance: Guidance,
    preference: Preference | None,
    vocab_size: int,
):
    """The forwards each step needs, and a function restoring the guides' state afterwards.

    Models whose coefficient is 0 on every row are skipped. When the PARM is the base model plus
    its adapter (the same module object), base and PARM rows run as one batched forward with
    the adapter gated off on the base rows: the weights are read once per step, not twice.
    ``preference`` None plans for rows that are not there yet (:class:`DecodingBatch`): every
    model is kept, the coefficients are computed as rows join.
    """
    inverse_beta = 0.0 if guidance.beta == float("inf") else 1.0 / guidance.beta
    if guidance.mode in ("parm", "policy"):
        from align.adapters import get_preference, preference_tuner, set_preference

        arm = guidance.models[0]
        tuner = preference_tuner(arm)
        previous = get_preference(arm)
        if guidance.mode == "policy":
            forwards = [ModelForward(arm, vocab_size, [ScoreTerm(_ones, uses_alpha=True)], arm=arm)]
        else:
            guide = ScoreTerm(_constant(inverse_beta), uses_alpha=True)
            if base is not None and arm.get_base_model() is base:
                terms = [ScoreTerm(_ones, gate=0.0)]
                terms += [replace(guide, gate=1.0)] if inverse_beta else []
                forwards = [ModelForward(arm, vocab_size, terms, arm=arm)]
            else:
                forwards = [ModelForward(base, vocab_size, [ScoreTerm(_ones)])]
                if inverse_beta:
                    forwards.append(ModelForward(arm, vocab_size, [guide], arm=arm))

        def restore() -> None:
            tuner.set_row_gate(None)
            set_preference(arm, previous)

    else:
        if guidance.mode == "genarm":
            pairs = [(base, _ones)] + [
                (arm, _column(j, inverse_beta)) for j, arm in enumerate(guidance.models)
            ]
        else:
            pairs = [(policy, _column(j)) for j, policy in enumerate(guidance.models)]
        forwards = [ModelForward(model, vocab_size, [ScoreTerm(weight)]) for model, weight in pairs]
        if guidance.mode == "mod" and guidance.divergence != "reverse_kl":
            forwards.insert(0, ModelForward(base, vocab_size, [ScoreTerm(_ones, reference=True)]))

        def restore() -> None:
            return None

    if preference is None:
        return forwards, restore
    alpha = preference.to_tensor(torch.float32)
    for forward in forwards:
        for term in forward.terms:
            term.coefficient = term.weight(alpha)
        if forward.arm is not None:
            forward.alpha = preference
    if guidance.mode in ("genarm", "mod"):
        forwards = [
            f for f in forwards if f.terms[0].reference or bool((f.terms[0].coefficient != 0).any())
        ]
    return forwards, restore


def combine_scores(
    guidance: Guidance, forwards: Sequence[ModelForward], outputs: Sequence
) -> torch.Tensor:
    """The next-token log-probs of one step from every model's (per term) log-probs."""
    if guidance.divergence == "reverse_kl":
        scores = 0
        for forward, log_probs in zip(forwards, outputs):
            for term, values in zip(forward.terms, log_probs):
                scores = scores + term.coefficient * values
        return torch.log_softmax(scores, dim=-1)  # the normaliser log Z
    from align.decoding.divergences import mix_policies

    reference, weights, policies = None, [], []
    for forward, log_probs in zip(forwards, outputs):
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


@torch.no_grad()
def guided_decode(
    base: nn.Module | None,
    guidance: Guidance,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    preference: PreferenceLike,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    vocab_size: int,
    do_sample: bool = False,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: Any = None,
    generator: torch.Generator | None = None,
    streamer: Any = None,
    repeats: int = 1,
    drop_finished: bool = True,
    on_rows_kept: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Decode from left-padded ``input_ids``; returns ``(repeats · B, prompt + new)`` token ids.

    ``repeats`` > 1 answers every prompt ``repeats`` times, row ``k·B + i`` being prompt ``i``
    at preference row ``k·B + i`` (e.g. one α of a sweep per block of B rows): each model whose
    prompt scores do not depend on α (the base, GenARM's ARMs, MOD's policies) reads the prompts
    once, and its cache is shared by the repeats. Rows that finish leave the batch (and every
    cache), so the remaining rows decode at the cost of their own number (``drop_finished=False``
    keeps them to the end, as plain ``generate`` does: the baseline of
    ``evaluation/benchmarks/sweep_pass.py``). ``on_rows_kept(index)`` is told which of the rows
    still decoding stay (indices into them) each time finished rows leave: per-row state held
    outside the models' caches follows it (:func:`align.decoding.plain.weighted_lora_rows`).
    """
    if guidance.needs_base and base is None:
        what = "its reference policy" if guidance.mode == "mod" else "a base model"
        raise ValueError(
            f"{guidance.mode} guidance ({guidance.divergence}) needs {what}: pass the base model"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    rows = input_ids.shape[0] * repeats
    preference = Preference.coerce(preference, guidance.objectives).expand(rows)
    device = input_ids.device
    processors = logits_processor if logits_processor is not None else LogitsProcessorList()
    eos = torch.tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []), device=device
    )

    forwards, restore = plan_forwards(base, guidance, preference, vocab_size)
    try:
        for forward in forwards:
            for term in forward.terms:
                term.coefficient = term.coefficient.to(device)[:, None]
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        outputs = [f.prefill((input_ids, attention_mask, positions), repeats) for f in forwards]
        sequences = input_ids.repeat(repeats, 1)
        mask = attention_mask.repeat(repeats, 1)
        positions = positions[:, -1:].repeat(repeats, 1)
        active = torch.arange(rows, device=device)  # rows still decoding, in batch order
        next_tokens = sequences[:, -1]
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        if streamer is not None:
            streamer.put(sequences.cpu())
        for step in range(max_new_tokens):
            if step:
                outputs = [f.step((next_tokens[:, None], mask, positions)) for f in forwards]
            scores = combine_scores(guidance, forwards, outputs)
            scores = processors(sequences[active], scores)
            if do_sample:
                next_tokens = torch.multinomial(
                    torch.softmax(scores, dim=-1), 1, generator=generator
                ).squeeze(1)
            else:
                next_tokens = scores.argmax(dim=-1)
            next_tokens = torch.where(
                finished[active], torch.full_like(next_tokens, pad_token_id), next_tokens
            )
            column = torch.full((rows,), pad_token_id, dtype=sequences.dtype, device=device)
            column[active] = next_tokens
            sequences = torch.cat([sequences, column[:, None]], dim=-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            positions = positions + 1
            if streamer is not None:
                streamer.put(column.cpu())
            if eos.numel():
                finished[active] |= torch.isin(next_tokens, eos)
            if stopping_criteria is not None:
                finished[active] |= stopping_criteria(sequences[active], scores).to(device)
            if bool(finished.all()):
                break
            done = finished[active]
            # Drop finished rows once they are an eighth of the batch: a cache copy per drop.
            if drop_finished and int(done.sum()) * 8 >= len(active):
                keep = (~done).nonzero().squeeze(1)
                for forward in forwards:
                    forward.keep(keep, len(active))
                if on_rows_kept is not None:
                    on_rows_kept(keep)
                active, next_tokens = active[keep], next_tokens[keep]
                mask, positions = mask[keep], positions[keep]
    finally:
        restore()
        if streamer is not None:
            streamer.end()
    return sequences


def _check_tokenizers(tokenizer: Any, guidance: Guidance) -> None:
    for index, other in enumerate(guidance.tokenizers):
        if other is not None:
            check_same_tokenizer(tokenizer, other, f"guiding model {index} ({guidance.mode})")


def guided_generate(
    base: nn.Module | None,
    tokenizer: Any,
    prompts: Sequence[str],
    guidance: Guidance,
    preference: PreferenceLike,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    streamer: Any = None,
    chat_template: bool = True,
    repeats: int = 1,
    on_rows_kept: Callable[[torch.Tensor], None] | None = None,
) -> list[str]:
    """Answer prompts with guided decoding; α may be one vector or one row per answer.

    ``repeats`` answers every prompt that many times, answer ``k·N + i`` being prompt ``i`` at
    preference row ``k·N + i`` (see :func:`guided_decode`; :func:`guided_sweep` uses it)."""
    from align.chat import encode_prompts

    _check_tokenizers(tokenizer, guidance)
    batch = encode_prompts(tokenizer, list(prompts), chat_template)
    device = next((base or guidance.models[0]).parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    sequences = guided_decode(
        base,
        guidance,
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        preference,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
        do_sample=do_sample,
        logits_processor=sampling_processors(do_sample, temperature, top_k, top_p),
        generator=generator,
        streamer=streamer,
        repeats=repeats,
        on_rows_kept=on_rows_kept,
    )
    new_tokens = sequences[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def guided_sweep(
    base: nn.Module | None,
    tokenizer: Any,
    prompts: Sequence[str],
    guidance: Guidance,
    preferences: PreferenceLike,
    **options: Any,
) -> list[list[str]]:
    """Answer every prompt at each of K preferences in one decoding pass: ``answers[k][i]`` is
    prompt i at α_k. The models whose prompt scores do not depend on α read the prompts once for
    all K. ``options`` are :func:`guided_generate`'s."""
    alphas = Preference.coerce(preferences, guidance.objectives)
    if not alphas.is_batched:
        alphas = Preference(alphas.weights[None], alphas.objectives)
    count = len(prompts)
    rows = Preference(alphas.weights.repeat_interleave(count, dim=0), alphas.objectives)
    texts = guided_generate(
        base, tokenizer, prompts, guidance, rows, repeats=len(alphas), **options
    )
    return [texts[k * count : (k + 1) * count] for k in range(len(alphas))]


def guided_custom_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: Any,
    generation_config: Any,
    synced_gpus: bool = False,
    guidance: Guidance | None = None,
    preference: PreferenceLike | None = None,
    guided_streamer: Any = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """Guided decoding behind the transformers API::

        base.generate(**inputs, custom_generate=guided_custom_generate,
                      guidance=parm_guidance(arm), preference=[0.7, 0.3], max_new_tokens=64)

    transformers prepares the inputs and the processors (temperature, top-k, top-p, ...), then
    hands control here; ``model`` is the base (for MOD: the reference policy of its f-divergence
    forms, unused by the reverse KL). Sampling with
    ``num_return_sequences`` works (a per-prompt α is repeated for each sample); beam search
    does not (a reward-guided beam needs every model's cache reordered). Stream tokens with
    ``guided_streamer=`` (transformers keeps ``streamer=`` for its own loop).
    """
    if guidance is None or preference is None:
        raise ValueError(
            "guided_custom_generate needs guidance= and preference= arguments to generate()"
        )
    if (generation_config.num_beams or 1) > 1:
        raise ValueError(
            "guided decoding does not support beam search (num_beams > 1); sample or decode greedily"
        )
    objectives = guidance.objectives
    preference = Preference.coerce(preference, objectives)
    rows = input_ids.shape[0]
    if preference.is_batched and len(preference) != rows:
        # generate() already repeated each prompt num_return_sequences times, rows kept together.
        factor = rows // len(preference)
        if factor * len(preference) != rows:
            raise ValueError(
                f"the preference has {len(preference)} rows but generate() made {rows}"
            )
        preference = Preference(preference.weights.repeat_interleave(factor, dim=0), objectives)
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    max_new_tokens = generation_config.max_length - input_ids.shape[1]
    # Only ids every model can score (GenARM's reference truncates to the base vocabulary).
    vocab_size = min(m.get_output_embeddings().weight.shape[0] for m in [model, *guidance.models])
    eos = generation_config.eos_token_id
    pad = generation_config.pad_token_id
    if pad is None:  # models without a pad token: finished rows repeat EOS, as transformers does
        first_eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        pad = first_eos if first_eos is not None else 0
    return guided_decode(
        model if guidance.needs_base else None,
        guidance,
        input_ids,
        attention_mask,
        preference,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        vocab_size=vocab_size,
        do_sample=bool(generation_config.do_sample),
        logits_processor=logits_processor,
        stopping_criteria=_any_row_done(stopping_criteria),
        streamer=guided_streamer,
    )


def _any_row_done(stopping_criteria: Any):
    """transformers' criteria include max length and EOS, which the loop handles itself; keep the
    rest (stop strings, ...) as a per-row check."""
    if not stopping_criteria:
        return None
    from transformers.generation.stopping_criteria import (
        EosTokenCriteria,
        MaxLengthCriteria,
        StoppingCriteriaList,
    )

    rest = StoppingCriteriaList(
        c for c in stopping_criteria if not isinstance(c, (EosTokenCriteria, MaxLengthCriteria))
    )
    return rest if len(rest) else None
