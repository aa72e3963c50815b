"""Reward-guided decoding of a fixed batch of prompts: drivers of the one decoder.

:func:`guided_generate` answers prompts (text in, text out), :func:`guided_sweep` answers them
at K preferences in one pass, :func:`guided_decode` works on token ids, and
:func:`guided_custom_generate` is transformers' ``custom_generate`` entry. All of them add their
rows to a :class:`~align.decoding.batch.DecodingBatch` and advance it until every row is done;
what guides (PARM, GenARM, MOD, a preference policy) is a
:class:`~align.decoding.guidance.Guidance`. All prompts of a batch decode together (left
padding), each row may carry its own α, and every model keeps its own KV cache advanced one
token at a time — the reference implementations decode one prompt at a time, which
:mod:`evaluation.benchmarks.guided_decoding` measures against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessorList

from align.decoding.batch import DecodingBatch, RowSettings
from align.decoding.guidance import Guidance, check_same_tokenizer
from align.decoding.sampling import Sampler
from align.preference import Preference, PreferenceLike


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
) -> torch.Tensor:
    """Decode from left-padded ``input_ids``; returns ``(repeats · B, prompt + new)`` token ids.

    ``repeats`` > 1 answers every prompt ``repeats`` times, row ``k·B + i`` being prompt ``i``
    at preference row ``k·B + i`` (e.g. one α of a sweep per block of B rows), the prompt
    forwards that do not depend on α shared. Sampling (``do_sample``) draws every row from
    ``generator`` after ``logits_processor``. Rows that finish leave the batch (and every
    cache) once they are an eighth of it, so the remaining rows decode at the cost of their own
    number (``drop_finished=False`` keeps them to the end, as plain ``generate`` does: the
    baseline of ``evaluation/benchmarks/sweep_pass.py``)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampler = Sampler(1.0, generator=generator) if do_sample else Sampler()
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    return _decode(
        base,
        guidance,
        input_ids,
        attention_mask,
        preference,
        [RowSettings(sampler, max_new_tokens, eos)] * (input_ids.shape[0] * repeats),
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        logits_processor=logits_processor,
        stopping_criteria=stopping_criteria,
        streamer=streamer,
        repeats=repeats,
        drop_finished=0.125 if drop_finished else None,
    )


def _decode(
    base: nn.Module | None,
    guidance: Guidance,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    preference: PreferenceLike,
    settings: list[RowSettings],
    *,
    vocab_size: int,
    pad_token_id: int,
    logits_processor: Any = None,
    stopping_criteria: Any = None,
    streamer: Any = None,
    repeats: int = 1,
    drop_finished: float | None = 0.125,
) -> torch.Tensor:
    """Every row of a left-padded batch decoded to its end on one :class:`DecodingBatch`."""
    rows = input_ids.shape[0] * repeats
    preference = Preference.coerce(preference, guidance.objectives).expand(rows)
    prompts = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]
    sequences = input_ids.repeat(repeats, 1)
    answers: dict[int, list[int]] = {}
    batch = DecodingBatch(
        base,
        guidance,
        vocab_size=vocab_size,
        device=input_ids.device,
        pad_token_id=pad_token_id,
        logits_processor=logits_processor or None,
        stopping_criteria=stopping_criteria,
        drop_finished=drop_finished,
    )
    try:
        batch.add(range(rows), prompts, preference, settings, repeats=repeats)
        if streamer is not None:
            streamer.put(sequences.cpu())
        while batch.unfinished:
            step = batch.advance()
            answers.update(step.finished)
            if streamer is not None:
                column = torch.full((rows,), pad_token_id, dtype=torch.long)
                column[step.keys] = torch.tensor(step.tokens, dtype=torch.long)
                streamer.put(column)
    finally:
        batch.close()
        if streamer is not None:
            streamer.end()
    new = torch.full(
        (rows, max(len(tokens) for tokens in answers.values())),
        pad_token_id,
        dtype=sequences.dtype,
        device=sequences.device,
    )
    for row, tokens in answers.items():
        new[row, : len(tokens)] = torch.tensor(tokens, dtype=sequences.dtype)
    return torch.cat([sequences, new], dim=-1)


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
) -> list[str]:
    """Answer prompts with guided decoding; α may be one vector or one row per answer.

    ``repeats`` answers every prompt that many times, answer ``k·N + i`` being prompt ``i`` at
    preference row ``k·N + i`` (see :func:`guided_decode`; :func:`guided_sweep` uses it).
    Sampled with a ``seed``, answer ``r`` draws from its own generator seeded ``seed + r``: it
    is the same whatever else is decoded beside it."""
    from align.chat import encode_prompts

    _check_tokenizers(tokenizer, guidance)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch = encode_prompts(tokenizer, list(prompts), chat_template)
    device = next((base or guidance.models[0]).parameters()).device
    rows = len(prompts) * repeats

    def sampler(row: int) -> Sampler:
        if not do_sample:
            return Sampler()
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed + row)
        return Sampler(temperature, top_p, top_k, generator)

    eos = tokenizer.eos_token_id
    sequences = _decode(
        base,
        guidance,
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        preference,
        [
            RowSettings(sampler(row), max_new_tokens, [] if eos is None else [eos])
            for row in range(rows)
        ],
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        repeats=repeats,
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
    """transformers' criteria include max length and EOS, which the decoder handles itself; keep
    the rest (stop strings, ...) as a per-row check."""
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
