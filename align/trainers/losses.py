"""The pairwise loss of every align preference trainer, one per objective.

Each objective orders a pair its own way (``preferred[:, i]``: 0, 1, or a tie, which that
objective skips); its loss is the mean ``−log σ(β_i (s_w − s_l))`` over its decided pairs. The
m losses go to the multi-gradient core, which combines them (a pure function of the scores, so
the trainers, their tests and the benchmarks compute the same numbers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from align.data.schema import TIE


def objective_losses(
    scores_0: torch.Tensor,
    scores_1: torch.Tensor,
    preferred: torch.Tensor,
    betas: torch.Tensor,
    pair_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per objective: mean ``−log σ(β_i (s_w − s_l))`` over its decided pairs (each pair's
    term times ``pair_weights[pair, i]`` when given), the pairwise accuracy, and the number
    of decided pairs. An objective with none contributes 0.

    ``scores_0`` / ``scores_1``: (B,) scores of each pair's responses; ``preferred``: (B, m);
    ``betas``: (m,)."""
    decided = preferred != TIE
    sign = torch.where(preferred == 0, 1.0, -1.0).to(scores_0)
    margins = (scores_0 - scores_1).unsqueeze(1) * sign  # (B, m): s_w − s_l
    per_pair = -F.logsigmoid(betas.to(margins) * margins)
    if pair_weights is not None:
        per_pair = per_pair * pair_weights.to(per_pair)
    counts = decided.sum(dim=0)
    losses = (per_pair * decided).sum(dim=0) / counts.clamp(min=1)
    accuracy = ((margins.detach() > 0) & decided).sum(dim=0) / counts.clamp(min=1)
    return losses, accuracy, counts
