"""FAMO: balance the rate at which every loss falls, with O(1) extra cost per step.

Liu, Liu, Jin, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023.
Weights ``z = softmax(ξ)`` come from learnable logits ξ.

* The model step minimises ``Σ_i z_i log(L_i − b_i) / c`` with ``c = Σ_i z_i / (L_i − b_i)``
  (held constant), i.e. it follows ``Σ_i w_i ∇L_i`` with ``w_i = z_i / (c (L_i − b_i))``,
  weights that sum to 1. ``b`` is a lower bound of the losses (0 for the usual non-negative
  ones); working on log-losses makes the method scale invariant.
* After the step, :meth:`observe` receives the new losses and measures each log-loss's
  decrease ``δ_i = log(L_i^old − b_i) − log(L_i^new − b_i)``; ξ then takes one step on
  ``⟨z(ξ), δ⟩`` (gradient ``(∂z/∂ξ)ᵀ δ``) plus decay ``γ ξ``: weight moves *away* from losses
  that just improved a lot, towards those that did not. As in the authors' code the step is
  Adam with learning rate 0.025 and weight decay γ = 1e-3.

Pass :meth:`observe` the losses *after* the optimizer step on the same batch (one extra forward,
no backward), as the paper does; the next batch's losses also work but add batch noise to δ.
Inside :class:`~align.mograd.engine.MultiObjectiveEngine` (the trainers) FAMO is instead
observed once per optimizer step with the step's mean losses (:meth:`observe_step`): δ then
compares consecutive steps, ``log(L̄_{t−1} − b) − log(L̄_t − b)`` — the effect of update t−1,
on the next step's batches — and ξ's step applies from step t + 1 on (the state is the same for
every micro-batch of a step).
ξ, its Adam moments and the last losses are buffers (not parameters: the model's optimizer
must not touch ξ), so ``state_dict`` resumes FAMO exactly. Not preference-based: α is ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from align.mograd.base import LossAggregator
from align.mograd.registry import register_aggregator
from align.mograd.state import ObjectiveState

_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


@register_aggregator("famo")
class FAMO(ObjectiveState, LossAggregator):
    """Loss-level FAMO; see the module docstring for the two updates.

    Args:
        lr: step size of the logits (Adam), 0.025 as in the paper's code.
        weight_decay: γ, decay of the logits towards equal weights (1e-3).
        min_losses: b, a lower bound of every loss (a number or one per objective; 0).
        eps: added to ``L − b`` before the log, so a loss at its bound stays finite.
    """

    def __init__(
        self,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        min_losses: float | list[float] = 0.0,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("eps", eps)):
            if not (isinstance(value, int | float) and 0 <= value < float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.lr, self.weight_decay, self.eps = float(lr), float(weight_decay), float(eps)
        self.min_losses = torch.as_tensor(min_losses, dtype=torch.float64)
        if self.min_losses.ndim > 1 or not torch.isfinite(self.min_losses).all():
            raise ValueError(f"min_losses must be finite numbers, got {min_losses!r}")
        float64 = {"dtype": torch.float64}
        self.register_buffer("logits", torch.empty(0, **float64))
        self.register_buffer("exp_avg", torch.empty(0, **float64))
        self.register_buffer("exp_avg_sq", torch.empty(0, **float64))
        self.register_buffer("adam_steps", torch.zeros((), dtype=torch.long))
        # The losses of the last combine (θ before the step), waiting for observe.
        self.register_buffer("pending", torch.empty(0, **float64))
        self.register_buffer("has_pending", torch.zeros((), dtype=torch.bool))
        # observe_step: the mean losses of the last optimizer step.
        self.register_buffer("step_losses", torch.empty(0, **float64))
        self.register_buffer("has_step_losses", torch.zeros((), dtype=torch.bool))

    def _gaps(self, losses: Tensor) -> Tensor:
        """``L − b + eps``, refusing losses below their declared bound."""
        bound = self.min_losses.to(losses).expand_as(losses)
        gaps = losses - bound
        if (gaps.detach() < 0).any():
            raise ValueError(
                f"FAMO needs losses >= min_losses {bound.tolist()}, got "
                f"{losses.detach().tolist()}; set min_losses to a lower bound of every loss"
            )
        return gaps + self.eps

    def _state(self, m: int, device) -> None:
        for name in ("logits", "exp_avg", "exp_avg_sq", "pending", "step_losses"):
            self._size_buffer(name, (m,), 0.0, device)

    def combine(self, losses: Tensor, preference: Tensor | None) -> Tensor:
        self._state(losses.numel(), losses.device)
        z = torch.softmax(self.logits, dim=0).to(losses)
        gaps = self._gaps(losses)
        c = (z / gaps.detach()).sum()
        self.last_weights = (z / (c * gaps.detach())).detach()
        self.pending.copy_(losses.detach().to(self.pending))
        self.has_pending.fill_(True)
        return (z * torch.log(gaps)).sum() / c

    def observe(self, losses: Tensor) -> None:
        if not bool(self.has_pending):
            return  # nothing to compare with: no combine since the last observe
        losses = losses.detach().to(self.pending).reshape(-1)
        if losses.numel() != self.pending.numel():
            raise ValueError(
                f"FAMO: observe got {losses.numel()} losses, combine had {self.pending.numel()}"
            )
        self._step(self.pending, losses)
        self.has_pending.fill_(False)

    def observe_step(self, losses: Tensor) -> None:
        """The engine's once-per-step observation (mean losses of the step, before its update):
        one logit step on the change since the previous step's mean losses."""
        losses = losses.detach().to(torch.float64).reshape(-1)
        self._state(losses.numel(), losses.device)
        losses = losses.to(self.step_losses)
        if bool(self.has_step_losses):
            self._step(self.step_losses, losses)
        self.step_losses.copy_(losses)
        self.has_step_losses.fill_(True)
        self.has_pending.fill_(False)  # the combines since were of these same losses

    def _step(self, before: Tensor, after: Tensor) -> None:
        """One Adam step of ξ on ``⟨z(ξ), δ⟩``, ``δ = log(before − b) − log(after − b)``."""
        delta = torch.log(self._gaps(before)) - torch.log(self._gaps(after))
        z = torch.softmax(self.logits, dim=0)
        # (∂z/∂ξ)ᵀ δ for the softmax Jacobian diag(z) − z zᵀ, plus weight decay (as in Adam's
        # L2 form, which is what the authors' torch.optim.Adam(weight_decay=γ) does).
        grad = z * (delta - (z * delta).sum()) + self.weight_decay * self.logits
        self.adam_steps += 1
        step = int(self.adam_steps)
        self.exp_avg.mul_(_BETAS[0]).add_(grad, alpha=1 - _BETAS[0])
        self.exp_avg_sq.mul_(_BETAS[1]).addcmul_(grad, grad, value=1 - _BETAS[1])
        m_hat = self.exp_avg / (1 - _BETAS[0] ** step)
        v_hat = self.exp_avg_sq / (1 - _BETAS[1] ** step)
        self.logits -= self.lr * m_hat / (v_hat.sqrt() + _ADAM_EPS)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state saved before observe_step existed has no step losses: start without them.
        for name, empty in (("step_losses", self.step_losses), ("has_step_losses", None)):
            if prefix + "logits" in state_dict and prefix + name not in state_dict:
                state_dict[prefix + name] = (
                    torch.zeros((), dtype=torch.bool) if empty is None else empty.new_empty(0)
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
