"""Autoregressive reward models (GenARM): a causal LM whose reward is a sum of token log-probs.

``r(x, y) = Σ_t log π(y_t | x, y_<t)`` over the response tokens only (no length normalisation by
default, as in GenARM and PARM). Trained pairwise with no reference model:
``−log σ(β (r(x, y_w) − r(x, y_l)))``. Because the reward decomposes over tokens, the same model
guides decoding token by token (:mod:`align.decoding.guided`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from align.chat import format_prompt
from align.files import read_json
from align.rewards.scoring import IGNORE_INDEX, full_row_log_probs, fused_head

#: The training record the trainers write beside an adapter (objectives, β, scoring settings).
TRAINING_INFO = "align_training.json"


def tokenize_prompt(
    tokenizer: Any, prompt: str, *, max_prompt_length: int, chat_template: bool = True
) -> list[int]:
    """The prompt's token ids as the model sees them (chat template when the tokenizer has
    one); an over-long prompt loses its start, which keeps the question closest to the answer."""
    prompt_text = format_prompt(tokenizer, prompt) if chat_template else prompt
    prompt_ids = tokenizer(prompt_text, add_special_tokens=not chat_template)["input_ids"]
    return prompt_ids[-max_prompt_length:]


def tokenize_response(tokenizer: Any, response: str, max_tokens: int) -> list[int]:
    """The response's token ids followed by EOS, cut to ``max_tokens``. Tokenized apart from
    the prompt, so the prompt/response boundary is exact."""
    return (tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[
        :max_tokens
    ]


def encode_responses(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_length: int = 512,
    max_prompt_length: int | None = None,
    chat_template: bool = True,
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (response tokens only).

    Prompt and response are tokenized separately and concatenated, so the boundary is exact.
    The response ends with EOS (for chat models, the end-of-turn token), which is part of the
    reward: an ARM learns when an answer should stop. Over-long prompts lose their start;
    responses are cut to fit ``max_length``.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    rows, labels = [], []
    for prompt, response in zip(prompts, responses):
        prompt_ids = tokenize_prompt(
            tokenizer,
            prompt,
            max_prompt_length=max_prompt_length or max_length // 2,
            chat_template=chat_template,
        )
        response_ids = tokenize_response(tokenizer, response, max(1, max_length - len(prompt_ids)))
        rows.append(prompt_ids + response_ids)
        labels.append([IGNORE_INDEX] * len(prompt_ids) + response_ids)
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([row + [pad] * (width - len(row)) for row in rows]),
        "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
        "labels": torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for lab in labels]),
    }


def sequence_log_probs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    average: bool = False,
    **model_kwargs: Any,
) -> torch.Tensor:
    """``Σ_t log π(label_t | ·)`` per row over the labelled (response) tokens, shape (B,).

    ``labels``: the ids of the response tokens, ``IGNORE_INDEX`` elsewhere (as
    :func:`encode_responses` gives them). ``average=True`` divides by the number of response
    tokens (a length-normalised variant; the references do not normalise). Extra keyword
    arguments (e.g. ``pref=``) go to the model. Scored through TRL's fused LM head
    (:mod:`align.rewards.scoring`, added for the call if the model has none), as the trainers
    score.
    """
    with fused_head(model):
        scores = full_row_log_probs(
            model, input_ids, attention_mask, (labels != IGNORE_INDEX).long(), **model_kwargs
        )
    return scores.score(average).float()


def reward_settings(adapter: str | os.PathLike) -> dict[str, Any]:
    """How the ARM / PARM in ``adapter`` scored responses when it was trained, read from its
    training record (``align_training.json``), as :func:`arm_rewards` keyword arguments:
    ``length_normalize``, ``max_length`` and ``max_prompt_length``. A folder without a record
    (or a record from before these were stored) gets the trainers' defaults."""
    path = Path(adapter) / TRAINING_INFO
    record = read_json(path) if path.is_file() else {}
    return {
        "length_normalize": bool(record.get("length_normalize", False)),
        "max_length": int(record.get("max_length") or 1024),
        "max_prompt_length": int(record.get("max_prompt_length", 256)),
    }


@torch.no_grad()
def arm_rewards(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 512,
    max_prompt_length: int | None = None,
    length_normalize: bool = False,
    **model_kwargs: Any,
) -> torch.Tensor:
    """The ARM reward of each (prompt, response), batched; pass ``pref=α`` for a PARM.

    ``max_length``, ``max_prompt_length`` and ``length_normalize`` must be those the model was
    trained with to reproduce its training scores: ``**reward_settings(adapter_folder)``."""
    device = next(model.parameters()).device
    pref = model_kwargs.pop("pref", None)
    per_row = pref is not None and torch.as_tensor(getattr(pref, "weights", pref)).ndim == 2
    rewards = []
    for start in range(0, len(prompts), batch_size):
        if pref is not None:  # one α, or one row per example sliced with its batch
            rows = torch.as_tensor(getattr(pref, "weights", pref))
            model_kwargs["pref"] = rows[start : start + batch_size] if per_row else pref
        batch = encode_responses(
            tokenizer,
            prompts[start : start + batch_size],
            responses[start : start + batch_size],
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        )
        batch = {key: value.to(device) for key, value in batch.items()}
        rewards.append(
            sequence_log_probs(model, **batch, average=length_normalize, **model_kwargs).cpu()
        )
    return torch.cat(rewards) if rewards else torch.zeros(0)
