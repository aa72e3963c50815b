"""A rewarded soup decoded per row: LoRA adapters on one base, each row weighting them by its α.

The exact LoRA interpolation at α (``align merge`` of LoRA adapters) computes
``W x + Σ_k α_k ΔW_k x``. Attaching every input adapter to the shared base at once and scaling
adapter k's update by each row's own α_k computes that merged model for every row of one batch,
with the weights read once per step instead of once per α. :func:`lora_soup` hands it over as
a policy :class:`~align.decoding.guidance.Guidance`, so the one decoder runs it like any other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from align.decoding.guidance import Guidance, policy_guidance
from align.preference import Preference


class RowWeights:
    """Per-row weights of several LoRA adapters' updates (see :func:`lora_soup`)."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.weights: dict[str, torch.Tensor] = {}

    def set(self, weights: torch.Tensor | None) -> None:
        """``weights`` (rows, k), or (k,) for every row: row r computes
        ``W x + Σ_k weights[r, k] ΔW_k x``; None clears them."""
        if weights is None:
            self.weights = {}
            return
        weights = torch.as_tensor(weights).reshape(-1, len(self.names))
        for k, name in enumerate(self.names):
            self.weights[name] = weights[:, k].reshape(-1, 1, 1)

    def set_preference(self, preference: Preference | None) -> None:
        self.set(None if preference is None else preference.weights)

    def hook(self, name: str):
        # On lora_A's output (r numbers per token, not the layer's width): the update
        # s_k B_k A_k x is linear in it.
        def weighted(module, inputs, output):
            if name not in self.weights:
                raise RuntimeError("no α set on the LoRA soup: decode it through its guidance")
            return output * self.weights[name].to(output)

        return weighted


@contextlib.contextmanager
def lora_soup(base: Any, adapters: Mapping[str, str]) -> Iterator[Guidance]:
    """LoRA adapters ``{objective: folder}`` attached to ``base`` (in place) together; yields
    a policy guidance whose α (one per row) weights adapter k's update by α_k — the exact LoRA
    interpolation at each row's α. The base is bare again afterwards."""
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
        yield policy_guidance(model, objectives=names, set_preference=rows.set_preference)
    finally:
        for hook in hooks:
            hook.remove()
        model.unload()
