"""Exact interpolation of PEFT LoRA adapters: ΔW(α) = Σ_k α_k ΔW_k, with ΔW_k = s_k B_k A_k.

Averaging A and B separately, as the public rewarded-soups LLaMA code does and as PEFT's
``add_weighted_adapter(combination_type="linear")`` does, is not interpolation of the updates:

    (Σ_k α_k B_k)(Σ_j α_j A_j) = Σ_k α_k² B_k A_k + Σ_{k≠j} α_k α_j B_k A_j

has the wrong weights α_k² on each model's own update plus cross terms B_k A_j that neither model
ever learned (A_j's input directions paired with B_k's outputs), and it requires equal ranks.
The exact form stacks the ranks instead — the rank-R adapter, R = Σ_k r_k,

    A = [A_1; A_2; …; A_K]            (R × in)
    B = [α_1 s_1 B_1, …, α_K s_K B_K]  (out × R),  scaling 1

satisfies B A = Σ_k α_k s_k B_k A_k exactly, for any ranks (this is PEFT's ``cat`` combination,
the only exact one). Models with α_k = 0 are left out. The same sum can instead be folded into
the base weights as one dense ΔW per matrix, giving a plain checkpoint; see
:mod:`align.merging.adapters` for the adapter folders and the folding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from align.merging.base import Merge
from align.merging.registry import register_merge_method


@register_merge_method("lora", "lora_cat")
class LoraInterpolation(Merge):
    """Σ_k α_k ΔW_k of PEFT LoRA adapters, exactly: ranks concatenated (or dense ΔW folded)."""

    options = {"output": "adapter"}

    def check_options(self) -> None:
        if self.params["output"] not in ("adapter", "checkpoint"):
            raise ValueError(
                f"lora output must be 'adapter' (concatenated-rank LoRA) or 'checkpoint' "
                f"(ΔW folded into the base weights), got {self.params['output']!r}"
            )

    def run(self, config: Any, out: Path, *, overwrite: bool = False) -> list[Path]:
        from align.merging.adapters import merge_lora_adapters

        return merge_lora_adapters(
            config.models,
            out,
            preference=config.preference,
            sweep=config.sweep,
            output=self.params["output"],
            base_model=config.base_model,
            dtype=config.dtype,
            max_shard_size=config.max_shard_size,
            overwrite=overwrite,
            pass_size=config.pass_size,
        )

    @staticmethod
    def concatenate(
        lora_a: Sequence[Tensor],
        lora_b: Sequence[Tensor],
        scalings: Sequence[float],
        weights: Sequence[float],
    ) -> tuple[Tensor, Tensor]:
        """``(A, B)`` with ``B A = Σ_k w_k s_k B_k A_k`` (scaling 1); zero weights left out."""
        keep = [k for k, w in enumerate(weights) if float(w) != 0.0]
        if not keep:
            raise ValueError("every weight is zero: nothing to interpolate")
        a = torch.cat([lora_a[k] for k in keep], dim=0)
        b = torch.cat([lora_b[k] * (float(weights[k]) * float(scalings[k])) for k in keep], dim=1)
        return a, b

    @staticmethod
    def dense_delta(
        lora_a: Sequence[Tensor],
        lora_b: Sequence[Tensor],
        scalings: Sequence[float],
        weights: Sequence[float],
    ) -> Tensor:
        """``Σ_k w_k s_k B_k A_k`` as one dense ``out × in`` matrix."""
        delta = None
        for a, b, s, w in zip(lora_a, lora_b, scalings, weights):
            if float(w) == 0.0:
                continue
            term = (b @ a) * (float(w) * float(s))
            delta = term if delta is None else delta + term
        if delta is None:
            raise ValueError("every weight is zero: nothing to interpolate")
        return delta
