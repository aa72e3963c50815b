"""Reward-guided decoding: a frozen base steered token by token by preference-conditioned rewards.

At every step each model scores the next token and the scores are mixed per row::

    PARM:    log π(y|·) = log π_base + (1/β) · log π_PARM(y | ·, α)          (α injected into PARM)
    GenARM:  log π(y|·) = log π_base + (1/β) · Σ_j α_j · log π_ARM_j
    MOD:     log π(y|·) = Σ_j α_j · log π_j                                   (m policies, no base)

then renormalised. All prompts of a batch decode together (left padding), each row may carry its
own α, and every model keeps its own KV cache advanced one token at a time — the reference
implementations decode one prompt at a time, which :mod:`evaluation.benchmarks.guided_decoding`
measures against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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

Mode = Literal["parm", "genarm", "mod"]


@dataclass
class Guidance:
    """Which models guide the base, and how their scores are weighted by α.

    Build one with :func:`parm_guidance`, :func:`genarm_guidance` or :func:`mod_guidance`.
    """

    mode: Mode
    models: list[nn.Module]
    objectives: tuple[str, ...]
    beta: float = 1.0
    tokenizers: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in ("parm", "genarm", "mod"):
            raise ValueError(f"guidance mode must be 'parm', 'genarm' or 'mod', got {self.mode!r}")
        if not self.beta > 0:  # also rejects NaN; inf means no guidance
            raise ValueError(f"beta must be > 0 (or inf for no guidance), got {self.beta}")
        expected = 1 if self.mode == "parm" else len(self.objectives)
        if len(self.models) != expected:
            raise ValueError(
                f"{self.mode} guidance needs {expected} model(s), got {len(self.models)}"
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


def mod_guidance(policies: Mapping[str, nn.Module], tokenizers: Sequence[Any] = ()) -> Guidance:
    """MOD: one aligned policy per objective, mixed with weights α; no base model term."""
    return Guidance("mod", list(policies.values()), tuple(policies), 1.0, list(tokenizers))


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
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,  # prefill: no logits for every prompt position
        )
        self.cache = output.past_key_values
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
class _Group:
    """One forward per step: a model (own KV cache) run on ``len(coefficients)`` stacked copies
    of the batch, copy i weighted per row by ``coefficients[i]``."""

    scorer: _CachedScorer
    coefficients: list[torch.Tensor]


def _plan(base: nn.Module | None, guidance: Guidance, preference: Preference, vocab_size: int):
    """The forwards each step needs, and a function restoring the guides' state afterwards.

    Models whose coefficient is 0 on every row are skipped. When the PARM is the base model plus
    its adapter (the same module object), base and PARM rows run as one batched forward with
    the adapter gated off on the base rows: the weights are read once per step, not twice.
    """
    alpha = preference.to_tensor(torch.float32)
    rows = alpha.shape[0]
    inverse_beta = 0.0 if guidance.beta == float("inf") else 1.0 / guidance.beta
    ones = torch.ones(rows)
    if guidance.mode == "parm":
        from align.adapters import get_preference, preference_tuner, set_preference

        arm = guidance.models[0]
        tuner = preference_tuner(arm)
        previous = get_preference(arm)
        shared = base is not None and arm.get_base_model() is base
        # One α for every row takes the adapter's folded path (LoRA's per-token cost).
        same = bool((preference.weights == preference.weights[0]).all())
        injected = preference[0] if same else preference
        if shared:
            copies = 2 if inverse_beta else 1
            if not same:
                injected = Preference(preference.weights.repeat(copies, 1), preference.objectives)
            set_preference(arm, injected)
            tuner.set_row_gate(torch.cat([torch.zeros(rows), torch.ones(rows)])[: copies * rows])
            coefficients = [ones, torch.full((rows,), inverse_beta)][:copies]
            groups = [_Group(_CachedScorer(arm, vocab_size), coefficients)]
        else:
            set_preference(arm, injected)
            groups = [_Group(_CachedScorer(base, vocab_size), [ones])]
            if inverse_beta:
                groups.append(
                    _Group(_CachedScorer(arm, vocab_size), [torch.full((rows,), inverse_beta)])
                )

        def restore() -> None:
            tuner.set_row_gate(None)
            set_preference(arm, previous)

        return groups, restore
    if guidance.mode == "genarm":
        pairs = [(base, ones)] + [
            (arm, alpha[:, j] * inverse_beta) for j, arm in enumerate(guidance.models)
        ]
    else:
        pairs = [(policy, alpha[:, j]) for j, policy in enumerate(guidance.models)]
    groups = [_Group(_CachedScorer(m, vocab_size), [c]) for m, c in pairs if bool((c != 0).any())]
    return groups, lambda: None


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
) -> torch.Tensor:
    """Decode from left-padded ``input_ids``; returns ``(B, prompt + new)`` token ids."""
    if guidance.mode != "mod" and base is None:
        raise ValueError(f"{guidance.mode} guidance needs a base model")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    rows = input_ids.shape[0]
    preference = Preference.coerce(preference, guidance.objectives).expand(rows)
    device = input_ids.device
    processors = logits_processor if logits_processor is not None else LogitsProcessorList()
    eos = torch.tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []), device=device
    )

    groups, restore = _plan(base, guidance, preference, vocab_size)
    try:
        weights = [[c.to(device)[:, None] for c in group.coefficients] for group in groups]
        sequences, mask = input_ids, attention_mask
        step_input = sequences
        step_positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        for _ in range(max_new_tokens):
            scores = 0
            for group, coefficients in zip(groups, weights):
                copies = len(coefficients)
                inputs = (step_input, mask, step_positions)
                if copies > 1:  # only the shared-base group stacks the batch; no copies otherwise
                    inputs = tuple(t.repeat(copies, 1) for t in inputs)
                log_probs = group.scorer(*inputs)
                for copy, coefficient in enumerate(coefficients):
                    scores = scores + coefficient * log_probs[copy * rows : (copy + 1) * rows]
            scores = torch.log_softmax(scores, dim=-1)  # the normaliser log Z
            scores = processors(sequences, scores)
            if do_sample:
                next_tokens = torch.multinomial(
                    torch.softmax(scores, dim=-1), 1, generator=generator
                ).squeeze(1)
            else:
                next_tokens = scores.argmax(dim=-1)
            next_tokens = torch.where(
                finished, torch.full_like(next_tokens, pad_token_id), next_tokens
            )
            sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            if eos.numel():
                finished |= torch.isin(next_tokens, eos)
            if stopping_criteria is not None:
                finished |= stopping_criteria(sequences, scores).to(device)
            if bool(finished.all()):
                break
            step_input = next_tokens[:, None]
            step_positions = step_positions[:, -1:] + 1
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
) -> list[str]:
    """Answer prompts with guided decoding; α may be one vector or one row per prompt."""
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
    )
    new_tokens = sequences[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


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
    hands control here; ``model`` is the base (ignored for MOD). Sampling with
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
        None if guidance.mode == "mod" else model,
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
