"""SVD-LoRA layer: ``x -> V x -> ⊙ (σ, s·α) -> U``, a diagonal core in the low-rank space."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from align.adapters.base import PreferenceLayer


class SVDLoraCore(nn.Module):
    """The singular values: r learnable σ and one learnable scale s for the α block."""

    def __init__(self, r: int, random: bool = False) -> None:
        super().__init__()
        self.sigma = nn.Parameter(torch.zeros(r))
        self.pref_scale = nn.Parameter(torch.zeros(1))
        if random:
            nn.init.normal_(self.sigma, std=1.0)
            nn.init.normal_(self.pref_scale, std=1.0)

    def diagonal(self, alpha: torch.Tensor) -> torch.Tensor:
        """(σ, s·α): shape (r+m,) for α (m,), (B, r+m) for α (B, m)."""
        sigma = self.sigma.expand(*alpha.shape[:-1], -1)
        return torch.cat([sigma, self.pref_scale * alpha], dim=-1)

    def forward(self, hidden: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        diagonal = self.diagonal(alpha)
        if alpha.ndim == 2:  # one diagonal per example: broadcast over the sequence axes
            diagonal = diagonal.reshape(alpha.shape[0], *([1] * (hidden.ndim - 2)), -1)
        return hidden * diagonal


class SVDLoraLayer(PreferenceLayer):
    adapter_layer_names = ("svdlora_V", "svdlora_U", "svdlora_core")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.svdlora_V = nn.ModuleDict({})
        self.svdlora_U = nn.ModuleDict({})
        self.svdlora_core = nn.ModuleDict({})

    def update_layer(self, adapter_name: str, config, inference_mode: bool = False) -> None:
        rank = config.r + len(config.objectives)
        self.svdlora_V[adapter_name] = nn.Linear(self.in_features, rank, bias=False)
        self.svdlora_U[adapter_name] = nn.Linear(rank, self.out_features, bias=False)
        self.svdlora_core[adapter_name] = SVDLoraCore(config.r, random=not config.init_weights)
        nn.init.normal_(self.svdlora_V[adapter_name].weight, std=config.init_std)
        nn.init.normal_(self.svdlora_U[adapter_name].weight, std=config.init_std)
        self._finish_update(adapter_name, config, config.scaling, inference_mode)

    def _core_apply(self, adapter: str, hidden: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return self.svdlora_core[adapter](hidden, alpha)

    def core_matrix(self, adapter: str, alpha: torch.Tensor) -> torch.Tensor:
        return torch.diag(self.svdlora_core[adapter].diagonal(alpha))


class Linear(nn.Module, SVDLoraLayer):
    """SVD-LoRA around a linear layer (plain or bitsandbytes 4-bit / 8-bit)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs: Any) -> None:
        super().__init__()
        SVDLoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    # nn.Module comes first in the MRO (as in PEFT's layers), so bind the adapter forward here.
    forward = PreferenceLayer.forward

    def __repr__(self) -> str:
        return "svdlora." + super().__repr__()
