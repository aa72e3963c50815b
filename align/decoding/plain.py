"""Plain (unguided) batched generation: the baseline every guided decoder is compared with."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
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


class RowWeights:
    """Per-row weights of several LoRA adapters' updates (see :func:`weighted_lora_rows`)."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.weights: dict[str, torch.Tensor] = {}

    def set(self, weights: torch.Tensor) -> None:
        """``weights`` (rows, k): row r computes ``W x + Σ_k weights[r, k] ΔW_k x``."""
        for k, name in enumerate(self.names):
            self.weights[name] = weights[:, k].reshape(-1, 1, 1)

    def keep(self, rows: torch.Tensor) -> None:
        """Only ``rows`` go on (finished rows left the batch: ``guided_decode``'s
        ``on_rows_kept``)."""
        for name in self.names:
            self.weights[name] = self.weights[name][rows.to(self.weights[name].device)]

    def hook(self, name: str):
        # On lora_A's output (r numbers per token, not the layer's width): the update
        # s_k B_k A_k x is linear in it.
        return lambda module, inputs, output: output * self.weights[name].to(output)


@contextlib.contextmanager
def weighted_lora_rows(base: Any, adapters: Mapping[str, str]):
    """LoRA adapters ``{name: folder}`` attached to ``base`` (in place) at once, adapter k's
    update weighted per row: yields a :class:`RowWeights`; ``set(w)`` with ``w`` of shape
    ``(rows, k)`` makes ``base`` compute ``W x + Σ_k w[r, k] ΔW_k x`` for row r. With w a row's
    α this is the exact LoRA interpolation (rewarded soup) at that α, for every row of one
    batch. The base is bare again afterwards."""
    from peft.tuners.lora import LoraLayer

    from align.adapters.loading import load_adapter

    names = list(adapters)
    model = load_adapter(base, adapters[names[0]], adapter_name=names[0])
    hooks = []
    try:
        for name in names[1:]:
            load_adapter(model, adapters[name], adapter_name=name)
        model.base_model.set_adapter(names)  # every adapter's update is added
        model.eval()
        rows = RowWeights(names)
        for module in model.modules():
            if isinstance(module, LoraLayer):
                if any(module.lora_embedding_A.get(n) is not None for n in names):
                    raise ValueError("per-row weights apply to LoRA on linear layers only")
                for name in names:
                    if name in module.lora_A:
                        hooks.append(module.lora_A[name].register_forward_hook(rows.hook(name)))
        yield rows
    finally:
        for hook in hooks:
            hook.remove()
        model.unload()
