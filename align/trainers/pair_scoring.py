"""How a preference trainer scores the two responses of every pair of a collated batch.

The collator (:mod:`align.trainers.data`) lays a batch of B pairs out as 2B rows
``[response_0; response_1]``, as full rows and, split at the prompt, as one prefix per pair and
2B continuations. With ``share_prompt`` each pair's prompt is read once and its KV cache serves
both responses (:func:`align.rewards.scoring.continuation_log_probs`, the scoring the rewards
use too); otherwise the 2B full rows are read. Both give the same scores and gradients.

The scores come back with what else the loss needs from the same forward (the trained model's
mean token NLL, for the language-model anchor), so nothing is kept on the trainer between calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch

from align.preference import Preference
from align.rewards.scoring import (
    ResponseLogProbs,
    continuation_log_probs,
    full_row_log_probs,
    prompt_cache,
)


class PairScores(NamedTuple):
    """The score of response_0 and of response_1, each (B,), higher meaning preferred, and the
    mean over the 2B responses of their mean token NLL under the model being trained (0-d)."""

    response_0: torch.Tensor
    response_1: torch.Tensor
    nll: torch.Tensor


def activation_checkpointing(model: Any) -> bool:
    """Whether ``model`` recomputes activations in backward, under either name transformers
    used (5.23 renamed gradient checkpointing activation checkpointing; the old name warns)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        try:
            return bool(getattr(model, name))
        except AttributeError:
            continue
    return False


def shares_prompt(
    model: Any, unwrapped: Any, inputs: Mapping[str, torch.Tensor], share_prompt: bool
) -> bool:
    """Whether the batch is scored with each prompt read once: asked for, the batch has the
    split layout, and no activation checkpointing in training (it recomputes the cache's
    writes)."""
    return (
        share_prompt
        and "prefix_ids" in inputs
        and inputs["prefix_ids"].shape[1] > 0
        and not (activation_checkpointing(unwrapped) and model.training)
    )


@contextlib.contextmanager
def pair_rows(unwrapped: Any, pairs: int) -> Iterator[None]:
    """A per-row α set for the 2B response rows (``[α; α]``), cut to its first B rows for a
    forward over one row per pair (the prompts), then put back."""
    from align.adapters.base import PreferenceTuner

    tuner = getattr(unwrapped, "base_model", None)
    preference = tuner.get_preference() if isinstance(tuner, PreferenceTuner) else None
    if preference is None or not preference.is_batched or len(preference) == pairs:
        yield
        return
    tuner.set_preference(Preference(preference.weights[:pairs], preference.objectives))
    try:
        yield
    finally:
        tuner.set_preference(preference)


def response_log_probs(
    model: Any, unwrapped: Any, inputs: Mapping[str, torch.Tensor], *, share_prompt: bool
) -> ResponseLogProbs:
    """Response-token log-probs of the batch's 2B rows through TRL's fused LM head (``model``
    carries it: TRL's trainer added it); ``unwrapped``: ``model`` without its DDP / DeepSpeed
    wrapper."""
    if not shares_prompt(model, unwrapped, inputs, share_prompt):
        return full_row_log_probs(
            model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        )
    prefix, prefix_mask = inputs["prefix_ids"], inputs["prefix_mask"]
    pairs = prefix.shape[0]
    with pair_rows(unwrapped, pairs):
        cache = prompt_cache(model, prefix, prefix_mask)
    owner = torch.arange(pairs, device=prefix.device).repeat(2)  # rows: [resp_0; resp_1]
    return continuation_log_probs(
        model,
        cache,
        owner,
        prefix_mask,
        inputs["continuation_ids"],
        inputs["continuation_mask"],
        inputs["continuation_completion_mask"],
    )
