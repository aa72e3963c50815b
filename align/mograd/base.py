"""The three interfaces of the multi-gradient core.

Every method turns m per-objective losses into one update, in one of three ways:

* a :class:`LossAggregator` maps the loss vector ``L ∈ R^m`` (and α, for preference-based
  methods) to one scalar; one backward of that scalar gives the update (linear scalarization,
  Tchebycheff, smooth Tchebycheff, PBI, COSMOS, DWA, uncertainty weighting, random weighting,
  FAMO);
* a :class:`GradientAggregator` maps the m×m Gram matrix ``G = J Jᵀ`` of the per-objective
  gradients to weights ``w``; the update is ``d = Σ w_i g_i = wᵀ J`` (MGDA, PCGrad, CAGrad,
  IMTL-G, Nash-MTL, UPGrad, EPO, DualProj, Aligned-MTL, ConFIG, GradVac, FairGrad). Needing
  only G is what makes these cheap to distribute: m² numbers describe the whole conflict
  between objectives;
* an :class:`UpdateAggregator` maps the Jacobian ``J (m, P)`` itself to the update ``d (P,)``,
  coordinate by coordinate (the learned optimizers ML2O, GML2O, Gram-L2O of
  :mod:`align.mograd.learned`, which look at every coordinate of every gradient and at their
  history); :class:`~align.mograd.engine.MultiObjectiveEngine` runs it like a gradient-level
  method (m backward passes for J, the update injected as the gradient).

All three are ``torch.nn.Module`` so that their state (loss history, learnable log-variances, FAMO's
logits) is saved and restored with ``state_dict`` when a training run resumes.

The core knows nothing about transformers: losses, gradients and Gram matrices only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn


def check_losses(losses: Tensor, name: str) -> Tensor:
    """A 1-D, finite loss vector, or a clear error."""
    if not isinstance(losses, Tensor):
        losses = torch.as_tensor(losses, dtype=torch.float32)
    if losses.ndim != 1 or losses.numel() == 0:
        raise ValueError(
            f"{name}: losses must be a 1-D tensor with one entry per objective, "
            f"got shape {tuple(losses.shape)}"
        )
    if not torch.isfinite(losses.detach()).all():
        raise ValueError(f"{name}: losses must be finite, got {losses.detach().tolist()}")
    return losses


def check_jacobian(jacobian: Tensor, name: str) -> None:
    """A 2-D ``(m, P)`` Jacobian with m >= 1 (one row per objective's gradient), or an error."""
    if not isinstance(jacobian, Tensor) or jacobian.ndim != 2 or jacobian.shape[0] == 0:
        shape = tuple(jacobian.shape) if isinstance(jacobian, Tensor) else type(jacobian)
        raise ValueError(
            f"{name}: the Jacobian must be a tensor of shape (m, P) with m >= 1 (one row per "
            f"objective's gradient), got {shape}"
        )


def check_preference(preference: Tensor | None, m: int, name: str, *, required: bool) -> Tensor:
    """α as a float tensor of shape (m,), or a clear error. ``None`` is allowed unless required."""
    if preference is None:
        if required:
            raise ValueError(
                f"{name} is preference-based: pass preference=α (one weight per objective, "
                f"summing to 1)"
            )
        return None
    weights = getattr(preference, "weights", preference)  # accepts an align.Preference
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.shape != (m,):
        raise ValueError(f"{name}: preference must have shape ({m},), got {tuple(weights.shape)}")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"{name}: preference {weights.tolist()} must be finite and >= 0")
    if abs(float(weights.sum()) - 1.0) > 1e-5:
        raise ValueError(f"{name}: preference {weights.tolist()} must sum to 1")
    return weights


class MultiGradientMethod(nn.Module, ABC):
    """What the three kinds share: flags the engine and the registry read, and the weights of
    the last call. Its state (loss history, recurrent state) goes through ``state_dict``."""

    #: "loss", "gradient" or "update": a label for listings; code dispatches on the class.
    kind = ""
    #: True when the method needs α (it then raises a ``ValueError`` without it).
    uses_preference = False
    #: True when α, if given, changes the update although it is optional (linear
    #: scalarization, UPGrad's pref_vector); :func:`~align.mograd.registry.
    #: preference_aware_aggregators` lists the methods with either flag.
    preference_aware = False
    #: True when the method also needs the loss values (EPO, ML2O's guard).
    uses_losses = False

    def __init__(self) -> None:
        super().__init__()
        #: The effective weight of each objective in the last call (for logging), or None.
        self.last_weights: Tensor | None = None


class LossAggregator(MultiGradientMethod):
    """Loss-level method: ``aggregator(losses, preference=α) -> scalar`` (one backward)."""

    kind = "loss"

    def forward(self, losses: Tensor, preference: Tensor | None = None) -> Tensor:
        losses = check_losses(losses, type(self).__name__)
        alpha = check_preference(
            preference, losses.numel(), type(self).__name__, required=self.uses_preference
        )
        if alpha is not None:
            alpha = alpha.to(losses)
        return self.combine(losses, alpha)

    @abstractmethod
    def combine(self, losses: Tensor, preference: Tensor | None) -> Tensor:
        """The scalar to minimise; ``preference`` is validated (or None)."""

    def observe(self, losses: Tensor) -> None:
        """Called with the (detached) losses after each optimizer step; stateful methods
        (DWA's history, FAMO's logits) update here. Default: nothing."""

    def observe_step(self, losses: Tensor) -> None:
        """What :class:`~align.mograd.engine.MultiObjectiveEngine` calls, once per optimizer
        step after its last micro-batch was combined, with the mean over the step's
        micro-batches (and processes) of the losses the step combined — the losses at the
        parameters *before* the step's update; the next step's combines see the new state.
        Default: :meth:`observe` with them (DWA's history, Tchebycheff's running ideal and
        warm-up); FAMO, which compares losses before and after an update, overrides it."""
        self.observe(losses)


class GradientAggregator(MultiGradientMethod):
    """Gradient-level method: weights from the Gram matrix, update ``d = wᵀ J``.

    Calling it on a Jacobian ``(m, n)`` returns the ``(n,)`` direction, the same convention as
    torchjd's aggregators; :meth:`weights` exposes the weights computed from a Gram matrix, which
    is all the distributed engine needs.
    """

    kind = "gradient"

    def forward(
        self, jacobian: Tensor, *, losses: Tensor | None = None, preference: Tensor | None = None
    ) -> Tensor:
        check_jacobian(jacobian, type(self).__name__)
        gram = jacobian @ jacobian.T
        weights = self.weights(gram, losses=losses, preference=preference)
        return weights.to(jacobian.dtype) @ jacobian

    def weights(
        self, gram: Tensor, *, losses: Tensor | None = None, preference: Tensor | None = None
    ) -> Tensor:
        """Validated entry point: the (m,) weights for a Gram matrix."""
        name = type(self).__name__
        if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
            raise ValueError(
                f"{name}: the Gram matrix must be square (m, m), got {tuple(gram.shape)}"
            )
        if not torch.isfinite(gram).all():
            raise ValueError(f"{name}: the Gram matrix has non-finite entries (NaN/inf gradients)")
        m = gram.shape[0]
        alpha = check_preference(preference, m, name, required=self.uses_preference)
        if self.uses_losses:
            if losses is None:
                raise ValueError(f"{name} needs the loss values: pass losses=")
            losses = check_losses(losses, name).detach()
        weights = self.compute_weights(gram.detach(), losses, alpha)
        self.last_weights = weights.detach()
        return weights

    @abstractmethod
    def compute_weights(
        self, gram: Tensor, losses: Tensor | None, preference: Tensor | None
    ) -> Tensor:
        """The (m,) weights; inputs are validated and detached."""


class UpdateAggregator(MultiGradientMethod):
    """``aggregator(J (m, P), losses=, preference=) -> d (P,)``, the gradient-like update.

    Like the other kinds it is an ``nn.Module``: its recurrent state is saved and restored with
    ``state_dict``. ``last_weights`` (m,) is set for logging where the method can say what weight
    each objective had (ML2O: the coefficients of d's projection onto the gradients' span).
    """

    kind = "update"

    def forward(
        self, jacobian: Tensor, *, losses: Tensor | None = None, preference: Tensor | None = None
    ) -> Tensor:
        name = type(self).__name__
        check_jacobian(jacobian, name)
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
