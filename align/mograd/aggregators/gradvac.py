"""GradVac: nudge each pair of gradients towards the cosine similarity they usually have.

Wang, Tsvetkov, Firat & Cao (ICLR 2021), "Gradient vaccine: investigating and improving
multi-task optimization in massively multilingual models", Algorithm 1 (the aggregation step,
``whole_model`` grouping); torchjd's ``GradVac`` (the same updates and defaults).
"""

from __future__ import annotations

import torch
from torch import Tensor

from align.mograd.base import GradientAggregator
from align.mograd.registry import register_aggregator
from align.mograd.state import ObjectiveState


@register_aggregator("gradvac")
class GradVac(ObjectiveState, GradientAggregator):
    """For each i: ``g_i^PC ← g_i``; for each j ≠ i in a random order, with
    ``φ_ij = cos(g_i^PC, g_j)`` and its EMA target ``φ̂_ij``: if ``φ_ij < φ̂_ij``,

        ``g_i^PC ← g_i^PC + ‖g_i^PC‖ (φ̂_ij √(1 − φ_ij²) − φ_ij √(1 − φ̂_ij²)) / (‖g_j‖ √(1 − φ̂_ij²)) · g_j``

    (which raises the cosine to φ̂_ij), then ``φ̂_ij ← (1 − β) φ̂_ij + β φ_ij``. The update is
    ``d = Σ_i g_i^PC``. Every ``g_i^PC`` stays a combination of the g_j, so it all runs on the
    Gram (``g_i^PC = Σ_k C_ik g_k``; the weights are ``Σ_i C_i·``). With φ̂ = 0 (the start) it
    is PCGrad's projection of conflicting pairs.

    Args:
        beta: EMA rate of the targets φ̂ in [0, 1] (0.5, torchjd's default; the paper's
            experiments use 1e-2).
        eps: added to the denominators (1e-8).
        seed: the visiting orders come from this instance's own generator (drawn like torchjd's
            ``torch.randperm`` calls, so with ``torch.manual_seed(seed)`` the two agree; the same
            on every data-parallel rank).

    State: φ̂ (m×m) is a buffer and the generator's state rides in ``state_dict``, so a resumed
    run continues exactly. φ̂ advances at every call: once per micro-batch under
    ``accumulation="micro"``, once per optimizer step under ``"full"``.
    """

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"GradVac: beta must be in [0, 1], got {beta!r}")
        if not eps >= 0.0:
            raise ValueError(f"GradVac: eps must be >= 0, got {eps!r}")
        self.beta, self.eps, self.seed = float(beta), float(eps), int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)
        self.register_buffer("targets", torch.empty(0, dtype=torch.float64))

    def compute_weights(
        self, gram: Tensor, losses: Tensor | None, preference: Tensor | None
    ) -> Tensor:
        g = gram.detach().to(device="cpu", dtype=torch.float64)
        m = g.shape[0]
        targets = self._size_buffer("targets", (m, m), 0.0, torch.device("cpu"))
        c = torch.eye(m, dtype=torch.float64)
        for i in range(m):
            cg = c[i] @ g  # g_i^PC · g_j for every j
            others = [j for j in range(m) if j != i]
            order = torch.randperm(len(others), generator=self._generator).tolist()
            for j in (others[k] for k in order):
                norm_i = (cg * c[i]).sum().clamp(min=0.0).sqrt()
                norm_j = g[j, j].clamp(min=0.0).sqrt()
                phi = cg[j] / (norm_i * norm_j + self.eps)
                target = targets[i, j]
                if phi < target:
                    root_phi = (1.0 - phi * phi).clamp(min=0.0).sqrt()
                    root_target = (1.0 - target * target).clamp(min=0.0).sqrt()
                    step = (
                        norm_i
                        * (target * root_phi - phi * root_target)
                        / (norm_j * root_target + self.eps)
                    )
                    c[i, j] += step
                    cg = cg + step * g[j]
                targets[i, j] = (1.0 - self.beta) * target + self.beta * phi
        return c.sum(dim=0).to(device=gram.device, dtype=gram.dtype)

    def get_extra_state(self) -> dict:
        return {"generator": self._generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self._generator.set_state(state["generator"])
