"""Run a multi-gradient method inside a training step.

A TRL / Accelerate training step computes a loss and calls ``accelerator.backward(loss)``;
gradient accumulation, mixed precision, clipping and DDP's gradient all-reduce all hang off that
one call. The engine keeps that shape: given the m losses of a batch it returns **one scalar to
backward** whose gradient is the method's update.

* loss-level methods: the scalar is the method's own (``Σ α_i L_i``, smooth Tchebycheff, ...);
* gradient-level methods: the per-objective gradients of the trainable parameters are taken
  with ``torch.autograd.grad``, stacked as ``J (m, P)``, averaged across processes in one
  collective (``torch.autograd.grad`` does not fire DDP's hooks), the weights ``w`` come from
  the Gram ``J Jᵀ`` (identical on every rank), and the scalar is ``Σ w_i L_i`` with ``w``
  detached.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from align.mograd.base import GradientAggregator, LossAggregator
from align.mograd.registry import get_aggregator


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class MultiObjectiveEngine:
    """Turns the m losses of a batch into the scalar a training step backpropagates.

    ``parameters`` are the trainable parameters the per-objective gradients are taken over (in
    practice the adapter's); only gradient-level methods need them.
    """

    def __init__(
        self,
        aggregator: str | LossAggregator | GradientAggregator = "linear",
        parameters: Iterable[nn.Parameter] | None = None,
        **options: Any,
    ) -> None:
        self.aggregator = get_aggregator(aggregator, **options)
        self.parameters = [p for p in (parameters or []) if p.requires_grad]
        if self.is_gradient_level and not self.parameters:
            raise ValueError(
                f"{self.aggregator.name} is a gradient-level method: pass the trainable "
                f"parameters its per-objective gradients are taken over"
            )
        self.last_weights: Tensor | None = None

    @property
    def is_gradient_level(self) -> bool:
        return isinstance(self.aggregator, GradientAggregator)

    def __call__(self, losses: Tensor, preference: Tensor | None = None) -> Tensor:
        """The scalar to backward for per-objective ``losses`` (shape (m,)) at α."""
        if not self.is_gradient_level:
            loss = self.aggregator(losses, preference)
            self.last_weights = self.aggregator.last_weights
            return loss
        jacobian = self.jacobian(losses)
        gram = jacobian @ jacobian.T
        weights = self.aggregator.weights(gram, losses=losses.detach(), preference=preference)
        self.last_weights = weights.detach()
        return (weights.detach().to(losses) * losses).sum()

    def jacobian(self, losses: Tensor) -> Tensor:
        """``J (m, P)``: row i is ∇ L_i over the parameters, averaged over processes."""
        rows = []
        for loss in losses:
            grads = torch.autograd.grad(loss, self.parameters, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                        for g, p in zip(grads, self.parameters)
                    ]
                )
            )
        jacobian = torch.stack(rows)
        if _world_size() > 1:
            dist.all_reduce(jacobian, op=dist.ReduceOp.SUM)
            jacobian /= _world_size()
        return jacobian

    def observe(self, losses: Tensor) -> None:
        """Pass the step's (detached) losses to stateful loss-level methods."""
        if isinstance(self.aggregator, LossAggregator):
            self.aggregator.observe(losses.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"aggregator": self.aggregator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.aggregator.load_state_dict(state["aggregator"])
