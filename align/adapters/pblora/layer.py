"""PBLoRA layer: the low-rank path ``x -> A x -> core(α) -> B``, never a dense ΔW per forward.

Both blocks share one input factor ``A = [A1; A2]`` ((r1+r2)×in) and one output factor
``B = [B1 B2]`` (out×(r1+r2)), so a forward is two thin matmuls like LoRA's; the core is
block-diagonal ``diag(W1, W2(α))``, applied on the r1+r2 hidden numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from align.adapters.base import PreferenceLayer


class PBLoraCore(nn.Module):
    """The α-dependent core: W1 (r1×r1) and Θ, a bias-free linear map α -> W2(α) (r2×r2)."""

    def __init__(self, r1: int, r2: int, num_objectives: int, theta_init: str = "fan_in_m") -> None:
        super().__init__()
        self.r1, self.r2 = r1, r2
        self.theta_init = theta_init
        self.w1 = nn.Parameter(torch.empty(r1, r1))
        self.theta = nn.Parameter(torch.empty(r2 * r2, num_objectives))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.w1.numel():
            nn.init.kaiming_uniform_(self.w1, a=math.sqrt(5))
        if self.theta_init == "parm":
            # PARM keeps Θ as (m, r2²) and initialises that: fan-in r2², bound 1/r2.
            nn.init.kaiming_uniform_(self.theta.T, a=math.sqrt(5))
        else:  # fan-in m, bound 1/√m
            nn.init.kaiming_uniform_(self.theta, a=math.sqrt(5))

    def w2(self, alpha: torch.Tensor) -> torch.Tensor:
        """W2(α): (r2, r2) for α (m,), or (B, r2, r2) for α (B, m)."""
        return (alpha @ self.theta.T).unflatten(-1, (self.r2, self.r2))

    def matrix(self, alpha: torch.Tensor) -> torch.Tensor:
        return torch.block_diag(self.w1, self.w2(alpha))

    def forward(self, hidden: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        first, second = hidden.split([self.r1, self.r2], dim=-1)
        w2 = self.w2(alpha)
        if alpha.ndim == 1:
            second = second @ w2.T
        else:  # one W2 per example: hidden (B, ..., r2) against (B, r2, r2)
            rows = second.shape[0]
            second = (second.reshape(rows, -1, self.r2) @ w2.transpose(1, 2)).reshape(second.shape)
        return torch.cat([first @ self.w1.T, second], dim=-1)


class PBLoraLayer(PreferenceLayer):
    adapter_layer_names = ("pblora_A", "pblora_B", "pblora_core")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.pblora_A = nn.ModuleDict({})
        self.pblora_B = nn.ModuleDict({})
        self.pblora_core = nn.ModuleDict({})

    def update_layer(self, adapter_name: str, config, inference_mode: bool = False) -> None:
        rank = config.r1 + config.r2
        self.pblora_A[adapter_name] = nn.Linear(self.in_features, rank, bias=False)
        self.pblora_B[adapter_name] = nn.Linear(rank, self.out_features, bias=False)
        self.pblora_core[adapter_name] = PBLoraCore(
            config.r1, config.r2, len(config.objectives), getattr(config, "theta_init", "fan_in_m")
        )
        nn.init.kaiming_uniform_(self.pblora_A[adapter_name].weight, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.pblora_B[adapter_name].weight)
        else:
            nn.init.normal_(self.pblora_B[adapter_name].weight, std=0.02)
        self._finish_update(adapter_name, config, config.scaling, inference_mode)

    def _core_apply(self, adapter: str, hidden: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return self.pblora_core[adapter](hidden, alpha)

    def core_matrix(self, adapter: str, alpha: torch.Tensor) -> torch.Tensor:
        return self.pblora_core[adapter].matrix(alpha)


class Linear(nn.Module, PBLoraLayer):
    """PBLoRA around a linear layer (plain or bitsandbytes 4-bit / 8-bit)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs: Any) -> None:
        super().__init__()
        PBLoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    # nn.Module comes first in the MRO (as in PEFT's layers), so bind the adapter forward here.
    forward = PreferenceLayer.forward

    def __repr__(self) -> str:
        return "pblora." + super().__repr__()
