"""The third kind of multi-gradient method: the whole update, coordinate by coordinate.

A :class:`~align.mograd.base.GradientAggregator` needs only the m×m Gram matrix and returns
weights; a learned optimizer such as ML2O looks at every coordinate of every per-objective
gradient (and at their history), so it needs the Jacobian ``J (m, P)`` itself and returns the
update ``d (P,)`` directly. :class:`UpdateAggregator` is that interface (``kind = "update"``);
:class:`~align.mograd.engine.MultiObjectiveEngine` runs it like a gradient-level method (m
backward passes for J, one all-reduce of J under DDP, the update injected as the gradient).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from align.mograd.base import check_losses, check_preference


class UpdateAggregator(nn.Module, ABC):
    """``aggregator(J (m, P), losses=, preference=) -> d (P,)``, the gradient-like update.

    Like the other kinds it is an ``nn.Module``: its recurrent state is saved and restored with
    ``state_dict``. ``last_weights`` (m,) is set for logging where the method can say what weight
    each objective had (ML2O: the coefficients of d's projection onto the gradients' span).
    """

    kind = "update"
    uses_preference = False
    uses_losses = False

    def __init__(self) -> None:
        super().__init__()
        self.last_weights: Tensor | None = None

    def forward(
        self, jacobian: Tensor, *, losses: Tensor | None = None, preference: Tensor | None = None
    ) -> Tensor:
        name = type(self).__name__
        if not isinstance(jacobian, Tensor) or jacobian.ndim != 2 or jacobian.shape[0] == 0:
            shape = tuple(jacobian.shape) if isinstance(jacobian, Tensor) else type(jacobian)
            raise ValueError(
                f"{name}: the Jacobian must be a tensor of shape (m, P) with m >= 1 (one row per "
                f"objective's gradient), got {shape}"
            )
        if not torch.isfinite(jacobian).all():
            raise ValueError(f"{name}: the Jacobian has non-finite entries (NaN/inf gradients)")
        m = jacobian.shape[0]
        alpha = check_preference(preference, m, name, required=self.uses_preference)
        if losses is not None:
            losses = check_losses(losses, name).detach()
        elif self.uses_losses:
            raise ValueError(f"{name} needs the loss values: pass losses=")
        return self.compute_update(jacobian.detach(), losses, alpha)

    @abstractmethod
    def compute_update(
        self, jacobian: Tensor, losses: Tensor | None, preference: Tensor | None
    ) -> Tensor:
        """The (P,) update for a validated, detached Jacobian."""
