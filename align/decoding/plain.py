"""Plain (unguided) batched generation: the baseline every guided decoder is compared with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from align.chat import encode_prompts


@torch.inference_mode()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    show_progress: bool = True,
    **generate_kwargs: Any,
) -> list[str]:
    """Answer each prompt with ``model.generate`` on left-padded batches; returns the texts."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seed is not None:
        torch.manual_seed(seed)
    prompts = list(prompts)
    device = next(model.parameters()).device
    sampling = (
        dict(do_sample=True, temperature=temperature, top_p=top_p)
        if do_sample
        else dict(do_sample=False)
    )
    responses: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generating", unit="batch", disable=not show_progress):
        batch = encode_prompts(tokenizer, prompts[start : start + batch_size]).to(device)
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
            **generate_kwargs,
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return [response.strip() for response in responses]
