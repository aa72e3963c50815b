"""Response log-probs, the one implementation the trainers and the rewards share.

An ARM's reward, a PARM's, and every preference trainer's pair score is ``Σ_t log π(y_t | x,
y_<t)`` over the response tokens. It is computed here, and only here, through TRL's fused LM
head (``model(..., labels=..., fused_lm_head=True)``: per-token log-probs without the
``(B, T, V)`` logits), either over full rows or with each prompt read once: its KV cache
(:func:`prompt_cache`) is shared by every response of that prompt, which gives the full-row
scores and gradients with fewer tokens.

Rows follow one convention: a response token is labelled by a mask that is 1 on the tokens
scored; the first position of a row is never scored (it has no previous token).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

IGNORE_INDEX = -100


class ResponseLogProbs(NamedTuple):
    """Summed response-token log-probs per row and the number of tokens summed, each (N,)."""

    total: torch.Tensor
    tokens: torch.Tensor

    def mean(self) -> torch.Tensor:
        """Mean token log-prob per row (a row with no token: its sum)."""
        return self.total / self.tokens.clamp(min=1).to(self.total)

    def score(self, length_normalize: bool = False) -> torch.Tensor:
        """The reward: the sum, or (``length_normalize``) the mean, per row."""
        return self.mean() if length_normalize else self.total


def _language_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def has_fused_head(model: Any) -> bool:
    """Whether TRL's fused LM head is on ``model`` (a transformers model or a PEFT model)."""
    forward = _language_model(model).forward
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)
    return code is not None and "fused_lm_head" in code.co_varnames


@contextlib.contextmanager
def fused_head(model: Any) -> Iterator[Any]:
    """``model`` with TRL's fused LM head for the duration of the block: added if it has none
    (TRL's trainers add it to theirs for good) and taken off again after, so a caller's model is
    left as it was (a patched forward would also survive ``copy.deepcopy`` bound to the
    original model). Its plain forward is unchanged meanwhile."""
    if has_fused_head(model):
        yield model
        return
    from trl.trainer.utils import add_fused_lm_head

    language_model = _language_model(model)
    previous = vars(language_model).get("forward")  # an instance forward (accelerate's hooks)
    add_fused_lm_head(language_model)
    try:
        yield model
    finally:
        if previous is None:
            del language_model.forward
        else:
            language_model.forward = previous


def prompt_cache(model: Any, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor) -> Any:
    """The KV cache of left-padded prompts (each less its last token, which starts its
    continuation): read once, then shared by every response of that prompt."""
    return model(
        input_ids=prefix_ids,
        attention_mask=prefix_mask,
        position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
    ).cache


def full_row_log_probs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    **model_kwargs: Any,
) -> ResponseLogProbs:
    """Log-probs of the tokens ``completion_mask`` marks, each row read whole. The model must
    carry the fused head (:func:`fused_head`)."""
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX),
        fused_lm_head=True,
        use_cache=False,
        **model_kwargs,
    )
    width = completion_mask.shape[1] - 1
    return ResponseLogProbs(
        outputs.log_probs[:, -width:].sum(dim=1), completion_mask[:, 1:].sum(dim=1)
    )


def continuation_log_probs(
    model: Any,
    cache: Any,
    owner: torch.Tensor,
    prefix_mask: torch.Tensor,
    continuation_ids: torch.Tensor,
    continuation_mask: torch.Tensor,
    completion_mask: torch.Tensor,
) -> ResponseLogProbs:
    """Log-probs of the tokens ``completion_mask`` marks in right-padded continuations, row
    ``j`` continuing from row ``owner[j]`` of ``cache`` (:func:`prompt_cache` of the left-padded
    prefixes ``prefix_mask`` describes): exactly the scores of the full rows, gradients through
    the cache included. Each continuation starts with its prompt's last token."""
    from transformers import DynamicCache

    shared = DynamicCache()
    for index, layer in enumerate(cache.layers):
        shared.update(layer.keys[owner], layer.values[owner], index)
    start = prefix_mask.sum(dim=1)[owner][:, None]
    width = continuation_ids.shape[1]
    outputs = model(
        input_ids=continuation_ids,
        attention_mask=torch.cat([prefix_mask[owner], continuation_mask], dim=1),
        position_ids=start + torch.arange(width, device=start.device),
        cache=shared,
        labels=continuation_ids.masked_fill(completion_mask == 0, IGNORE_INDEX),
        fused_lm_head=True,
        use_cache=False,
    )
    return ResponseLogProbs(outputs.log_probs.sum(dim=1), completion_mask.sum(dim=1))
