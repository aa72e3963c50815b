"""Tchebycheff scalarization ``max_i α_i (L_i − z_i)``.

Bowman (1976); in multi-objective learning e.g. Panacea (Zhong et al., NeurIPS 2024). Unlike
``Σ α_i L_i``, every Pareto-optimal point — on a non-convex front too — minimises it for some
α, which is why it is the usual alternative to linear scalarization. Its weakness is the max:
only the worst weighted objective gets a gradient, so gradient descent zig-zags between
objectives (smooth Tchebycheff, in ``smooth_tchebycheff.py``, fixes that).

The reference points are shared with smooth Tchebycheff:

* the **ideal point** z: a fixed value (default 0, a lower bound for the usual non-negative
  losses) or ``"running"``: the running minimum of the losses passed to :meth:`observe`, minus
  ``margin`` (a utopia point strictly below every loss seen, so no term is ever 0 by accident);
* optional **nadir normalisation** ``(L_i − z_i) / (n_i − z_i)``, so that objectives on different
  scales are compared in the same units: a fixed nadir n, or ``"warmup"``: as in LibMTL's STCH,
  n is fixed after a warm-up as the mean loss observed over the warm-up's second half (the first
  half, where losses still fall fast, would inflate it). During the warm-up the scalarization is
  used without normalisation (LibMTL instead trains on ``Σ log L_i`` then).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from align.mograd.base import LossAggregator
from align.mograd.registry import register_aggregator
from align.mograd.state import ObjectiveState


def _reference_spec(value, name: str, allowed: str) -> float | tuple[float, ...] | str | None:
    """A reference point option: a number, numbers, the keyword ``allowed``, or (nadir) None."""
    if value is None or (isinstance(value, str) and value == allowed):
        return value
    if isinstance(value, str):
        raise ValueError(f"{name} must be a number, one number per objective or {allowed!r}")
    try:
        values = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be finite numbers, got {value!r}") from error
    if values.ndim > 1 or values.numel() == 0 or not torch.isfinite(values).all():
        raise ValueError(f"{name} must be one finite number or one per objective, got {value!r}")
    return float(values) if values.ndim == 0 else tuple(values.tolist())


@register_aggregator("tchebycheff", "tch")
class Tchebycheff(ObjectiveState, LossAggregator):
    """``max_i α_i (L_i − z_i) / (n_i − z_i)`` (denominator 1 without nadir normalisation).

    Args:
        ideal: z — a number, one number per objective, or ``"running"`` (running minimum of the
            observed losses minus ``margin``; before the first :meth:`observe`, the current
            losses minus ``margin``).
        margin: how far below the running minimum z sits (absolute, in loss units).
        nadir: None (no normalisation), one number or one per objective, or ``"warmup"``.
        warmup_steps: with ``nadir="warmup"``, the number of :meth:`observe` calls (optimizer
            steps) before the nadir is fixed.

    The running ideal, the warm-up statistics and the fixed nadir are buffers, so they resume
    with ``state_dict``. Call :meth:`observe` once per optimizer step.
    """

    uses_preference = True

    def __init__(
        self,
        ideal: float | Sequence[float] | str = 0.0,
        *,
        margin: float = 1e-2,
        nadir: float | Sequence[float] | str | None = None,
        warmup_steps: int = 100,
    ) -> None:
        super().__init__()
        self.ideal = _reference_spec(ideal, "ideal", "running")
        self.nadir = _reference_spec(nadir, "nadir", "warmup")
        if not (isinstance(margin, int | float) and margin >= 0):
            raise ValueError(f"margin must be a number >= 0, got {margin!r}")
        if not (isinstance(warmup_steps, int) and warmup_steps >= 1):
            raise ValueError(f"warmup_steps must be an integer >= 1, got {warmup_steps!r}")
        if not isinstance(self.ideal, str) and self.nadir is not None and self.nadir != "warmup":
            gap = torch.as_tensor(self.nadir) - torch.as_tensor(self.ideal)
            if (gap <= 0).any():
                raise ValueError(f"nadir {nadir!r} must lie above the ideal point {ideal!r}")
        self.margin = float(margin)
        self.warmup_steps = warmup_steps
        float64 = {"dtype": torch.float64}
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("running_min", torch.empty(0, **float64))
        self.register_buffer("nadir_sum", torch.empty(0, **float64))
        self.register_buffer("nadir_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("nadir_point", torch.empty(0, **float64))

    # --- reference points --------------------------------------------------------------------
    def _fixed(self, value: float | tuple[float, ...], losses: Tensor) -> Tensor:
        point = torch.as_tensor(value, dtype=losses.dtype, device=losses.device)
        if point.ndim == 1 and point.numel() != losses.numel():
            raise ValueError(
                f"{type(self).__name__}: {point.numel()} reference values for "
                f"{losses.numel()} objectives"
            )
        return point.expand_as(losses)

    def ideal_point(self, losses: Tensor) -> Tensor:
        """z for this call (detached)."""
        if self.ideal != "running":
            return self._fixed(self.ideal, losses)
        if self.running_min.numel() == 0:
            return losses.detach() - self.margin
        return self.running_min.to(losses) - self.margin

    def scale(self, losses: Tensor, ideal: Tensor) -> Tensor:
        """``n − z``, or ones when not normalising (yet)."""
        if self.nadir is None:
            return torch.ones_like(ideal)
        if self.nadir == "warmup":
            if self.nadir_point.numel() == 0:
                return torch.ones_like(ideal)
            nadir = self.nadir_point.to(losses)
        else:
            nadir = self._fixed(self.nadir, losses)
        scale = nadir - ideal
        if (scale <= 0).any():
            raise ValueError(
                f"{type(self).__name__}: the nadir point {nadir.tolist()} is not above the ideal "
                f"point {ideal.tolist()}; choose an ideal below the losses"
            )
        return scale

    # --- the scalarization -------------------------------------------------------------------
    def reduce(self, terms: Tensor) -> tuple[Tensor, Tensor]:
        """The scalar from the weighted terms, and d scalar / d term (for ``last_weights``)."""
        value = terms.amax()  # amax splits the gradient evenly between tied maxima
        ties = (terms == value).to(terms.dtype)
        return value, ties / ties.sum()

    def combine(self, losses: Tensor, preference: Tensor | None) -> Tensor:
        for state in (self.running_min, self.nadir_point):
            if state.numel() not in (0, losses.numel()):
                raise ValueError(
                    f"{type(self).__name__} holds reference points for {state.numel()} "
                    f"objectives and now gets {losses.numel()} losses"
                )
        ideal = self.ideal_point(losses)
        scale = self.scale(losses, ideal)
        terms = preference * (losses - ideal) / scale
        value, share = self.reduce(terms)
        self.last_weights = (share * preference / scale).detach()
        return value

    def observe(self, losses: Tensor) -> None:
        losses = losses.detach().to(torch.float64).reshape(-1)
        m = losses.numel()
        self.steps += 1
        if self.ideal == "running":
            current = self._size_buffer("running_min", (m,), float("inf"), losses.device)
            current.copy_(torch.minimum(current, losses.to(current.device)))
        if self.nadir == "warmup" and self.nadir_point.numel() == 0:
            total = self._size_buffer("nadir_sum", (m,), 0.0, losses.device)
            window_start = self.warmup_steps - max(1, self.warmup_steps // 2)
            if int(self.steps) > window_start:
                total += losses.to(total.device)
                self.nadir_count += 1
            if int(self.steps) >= self.warmup_steps:
                self.nadir_point = total / self.nadir_count.clamp_min(1)
