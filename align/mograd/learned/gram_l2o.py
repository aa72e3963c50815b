"""Gram-L2O: a learned multi-gradient method that works in Gram space, guarded like GML2O.

ML2O (:mod:`~align.mograd.learned.ml2o`) reads every coordinate of every gradient and keeps a
recurrent state per parameter: O(m·P) network work per step and ~128 bytes of state per
trainable parameter, and under ZeRO each rank would need its own partition of that state.
Gram-L2O learns the *weights* instead: a small network reads scale-invariant features of the
m×m Gram matrix ``G = J Jᵀ``, the losses and a short history, and returns simplex weights w;
the update is ``d = wᵀ J``, formed by the engine's Gram path exactly as MGDA's. So it costs what
MGDA costs (O(m² P) for G, O(m P) for d; the network itself is a few thousand flops) and runs
everywhere MGDA runs — one process, DDP, DeepSpeed ZeRO-0/1/2/3 and feature-level — with no
per-coordinate state: its whole state is m × (16 + 3) numbers, the same on every rank because
every rank sees the same all-reduced Gram and mean losses.

**Features** (per objective i; all invariant to ``G → cG``, c > 0, and the losses' features to
scaling each loss): the log of the gradient norm over the geometric mean of the norms, the mean
and the minimum cosine to the other gradients, MGDA's weight ``w*_i`` (centred, ``m w*_i − 1``),
``‖d*‖ / ‖g_i‖`` (how much the min-norm point shrinks against this gradient), the log of the
loss relative to its first value and to the previous step's (0 without losses), and the weight
taken at the previous step; plus their mean over the objectives and one global feature,
``‖d*‖ / ‖ḡ‖`` (ḡ the mean gradient; 1 without conflict, 0 at a Pareto-stationary point).

**Network** (:class:`GramL2ONet`): one GRU cell shared by the objectives (each with its own
hidden state of 16: the history), a linear head giving a logit per objective and a gate on the
mean hidden state::

    w = (1 − γ) w* + γ softmax(z),      γ = sigmoid(gate)

so w is on the simplex, the network is permutation-equivariant (tied weights, symmetric pooling:
permuting the objectives permutes w) and usable for any m. Initialised with a zero head and a
gate at sigmoid(−3) ≈ 0.047, the untrained network is 95 % MGDA and 5 % equal weights;
meta-training learns when to leave MGDA and for which weights.

**The guard** (``guard=True``, the default), GML2O's test written on the Gram: with
``d = wᵀJ`` and ``d* = w*ᵀJ``, ``⟨d, g_i⟩ = (G w)_i``, ``‖d‖² = wᵀGw``, ``‖d*‖² = w*ᵀGw*``; the
learned weights are taken iff ``(G w)_i ≥ margin · ‖d*‖²`` for every i and
``‖d‖ ≤ max_ratio · ‖d*‖``, else MGDA's. Every returned direction therefore satisfies GML2O's
per-direction property (``⟨d, g_i⟩ ≥ c ‖d*‖²``, ``‖d‖ ≤ C ‖d*‖``, c = min(margin, 1),
C = max(max_ratio, 1)), and GML2O's convergence statement holds under its same terms (see
:mod:`~align.mograd.learned.gml2o`). ``last_accepted`` and ``acceptance_rate`` as GML2O's; the
trainers log it as ``gml2o/accepted``.

**State** (buffers, saved with ``state_dict``): ``history`` (m, 16 + 3) — the GRU state, the
first and the previous losses, the previous weights — and the counters. It advances on every
call (also on a rejected step: the history records the losses seen and the weights *taken*, so
after a rejection the network sees MGDA's weights as the previous ones). Under
``accumulation="micro"`` with k micro-batches per optimizer step it advances k times per step.
A call with another m starts a fresh history, with a warning.

Meta-trained like ML2O (``lab.meta_training.gram_meta`` in the repository, the same problems and
meta-loss, without the guard); default weights ship in ``weights/gram_l2o_default.safetensors``.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from align.mograd.aggregators.solvers import as_float64, min_norm_weights, to_weights
from align.mograd.base import GradientAggregator
from align.mograd.learned.weights_file import (
    load_weights,
    save_weights,
    shipped_weights,
    weights_info,
)
from align.mograd.registry import register_aggregator

DEFAULT_WEIGHTS = "gram_l2o_default.safetensors"
#: Per-objective features, and the global ones (see the module docstring).
NUM_FEATURES = 8
NUM_GLOBAL = 1
#: History columns after the GRU state: first loss, previous loss, previous weight.
EXTRA = 3


def default_weights_path() -> Path:
    """The shipped weights (``align/mograd/learned/weights/gram_l2o_default.safetensors``)."""
    return shipped_weights(DEFAULT_WEIGHTS)


def gram_features(
    gram: Tensor, losses: Tensor | None, history: Tensor, hidden: int
) -> dict[str, Tensor]:
    """Scale-free features of one step (float64), MGDA's weights and the loss columns.

    ``history`` (m, hidden + 3): ``[h | first loss | previous loss | previous weight]``
    (0 = not seen yet). Returns ``features`` (m, NUM_FEATURES), ``global`` (NUM_GLOBAL,),
    ``mgda`` (m,) MGDA's weights, ``mgda_norm2`` ‖d*‖², ``losses`` (m,) the losses used (0
    where none), ``first`` (m,) the first losses.
    """
    g = torch.as_tensor(as_float64(gram), dtype=torch.float64)
    m = g.shape[0]
    w_star = torch.as_tensor(min_norm_weights(g.numpy()), dtype=torch.float64)
    norms = g.diagonal().clamp_min(0).sqrt()
    tiny = math.sqrt(torch.finfo(torch.float64).tiny)
    alive = norms > tiny
    safe = torch.where(alive, norms, torch.ones_like(norms))
    cos = (g / torch.outer(safe, safe)).clamp(-1, 1) * torch.outer(alive, alive)
    if alive.any():
        log_norm = torch.where(alive, safe.log(), torch.zeros_like(safe))
        centre = log_norm[alive].mean()
        rel_norm = torch.where(alive, (log_norm - centre).clamp(-5, 5) / 5, -torch.ones_like(safe))
    else:
        rel_norm = torch.zeros(m, dtype=torch.float64)
    off = ~torch.eye(m, dtype=torch.bool)
    if m > 1:
        mean_cos = (cos * off).sum(1) / (m - 1)
        min_cos = torch.where(off, cos, torch.full_like(cos, 2.0)).amin(1)
    else:
        mean_cos = min_cos = torch.zeros(1, dtype=torch.float64)
    mgda_norm2 = (w_star @ g @ w_star).clamp_min(0)
    mgda_norm = mgda_norm2.sqrt()
    shrink = torch.where(alive, (mgda_norm / safe).clamp(0, 1), torch.zeros_like(safe))
    ones = torch.full((m,), 1.0 / m, dtype=torch.float64)
    mean_norm = (ones @ g @ ones).clamp_min(0).sqrt()
    conflict = (mgda_norm / mean_norm).clamp(0, 1) if mean_norm > tiny else mgda_norm * 0
    first, previous = history[:, hidden].double(), history[:, hidden + 1].double()
    previous_weight = history[:, hidden + 2].double()
    if losses is None:
        values = torch.zeros(m, dtype=torch.float64)
    else:
        values = losses.detach().double().reshape(m).cpu()
    positive = values > 0
    first = torch.where((first > 0) | ~positive, first, values)
    since_start = torch.where(
        positive & (first > 0),
        (values / first.clamp_min(1e-300)).clamp_min(1e-300).log().clamp(-5, 5) / 5,
        torch.zeros_like(values),
    )
    since_last = torch.where(
        positive & (previous > 0),
        (10 * (values / previous.clamp_min(1e-300)).clamp_min(1e-300).log()).clamp(-1, 1),
        torch.zeros_like(values),
    )
    seen = previous_weight.sum() > 0
    prior = m * previous_weight - 1 if seen else torch.zeros_like(values)
    features = torch.stack(
        [rel_norm, mean_cos, min_cos, m * w_star - 1, shrink, since_start, since_last, prior], 1
    )
    return {
        "features": features,
        "global": conflict.reshape(1),
        "mgda": w_star,
        "mgda_norm2": mgda_norm2,
        "losses": values,
        "first": first,
    }


class GramL2ONet(nn.Module):
    """Features of the Gram (and losses, history) → simplex weights; see the module docstring.

    :meth:`step` is differentiable in the network's parameters (meta-training) and works in
    float32 on the features; the weights come back in float64.
    """

    def __init__(self, hidden: int = 16, gate_init: float = -3.0) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError("GramL2ONet: hidden must be >= 1")
        self.hidden = int(hidden)
        self.gate_init = float(gate_init)
        self.cell = nn.GRUCell(2 * NUM_FEATURES + NUM_GLOBAL, hidden)
        self.head = nn.Linear(hidden, 1)
        self.gate = nn.Linear(hidden, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, gate_init)

    def config(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "gate_init": self.gate_init}

    def state_width(self) -> int:
        return self.hidden + EXTRA

    def fresh_history(self, m: int) -> Tensor:
        return torch.zeros(m, self.state_width(), dtype=torch.float32)

    def step(
        self, gram: Tensor, losses: Tensor | None, history: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(w (m,) float64, new history (m, hidden + 3), features)``; the new history's
        previous-weight column holds w (the caller overwrites it with the weights taken)."""
        m = gram.shape[0]
        inputs = gram_features(gram, losses, history.detach(), self.hidden)
        features = inputs["features"].float()
        pooled = features.mean(0, keepdim=True).expand(m, -1)
        glob = inputs["global"].float().reshape(1, -1).expand(m, -1)
        x = torch.cat([features, pooled, glob], 1)
        dtype = self.head.weight.dtype
        h = self.cell(x.to(dtype), history[:, : self.hidden].to(dtype))
        logits = self.head(h).squeeze(1)
        gamma = torch.sigmoid(self.gate(h.mean(0)).squeeze(0))
        learned = torch.softmax(logits.double(), 0)
        w = (1 - gamma.double()) * inputs["mgda"] + gamma.double() * learned
        extra = torch.stack([inputs["first"], inputs["losses"], w.detach()], 1).to(h.dtype)
        return w, torch.cat([h, extra], 1), inputs


def save_gram_network(net: GramL2ONet, path: str | os.PathLike, **info: Any) -> Path:
    """Write ``net`` as safetensors; its config and ``info`` (JSON-able) go in the metadata."""
    return save_weights(net, path, **info)


def load_gram_network(source: str | os.PathLike | GramL2ONet | None = "default") -> GramL2ONet:
    """A :class:`GramL2ONet`: ``"default"`` (shipped), a path written by
    :func:`save_gram_network`, a network (returned as is), or None (untrained)."""
    return load_weights(
        GramL2ONet,
        source,
        default_weights_path(),
        "train them with `python -m lab.meta_training recipes/gram_l2o_meta.yaml` "
        "or pass weights=None (untrained)",
    )


def gram_network_info(source: str | os.PathLike = "default") -> dict[str, Any]:
    """The ``info`` metadata stored with the weights."""
    return weights_info(source, default_weights_path())


def gram_accepts(
    gram: Tensor, weights: Tensor, baseline: Tensor, margin: float, max_ratio: float
) -> bool:
    """GML2O's test on the Gram (float64): ``(G w)_i ≥ margin · w*ᵀGw*`` for every i and
    ``wᵀGw ≤ max_ratio² · w*ᵀGw*``."""
    g = gram.double().cpu()
    w, b = weights.double().cpu(), baseline.double().cpu()
    floor = margin * float(b @ g @ b)
    inner = g @ w
    length2 = float(w @ g @ w)
    return bool((inner >= floor).all()) and length2 <= max_ratio**2 * max(float(b @ g @ b), 0.0)


@register_aggregator("gram_l2o", "graml2o")
class GramL2O(GradientAggregator):
    """Learned weights from the Gram matrix, guarded by GML2O's test against MGDA.

    Args:
        weights: ``"default"`` (shipped), a path to saved weights, or None (untrained).
        net: a :class:`GramL2ONet` to use instead of ``weights`` (tests, meta-training).
        guard: apply the guard (default True); False returns the network's weights as they are.
        margin, max_ratio: the guard's c and C (as GML2O's).

    ``uses_losses`` is False: the losses are read when the caller passes them (the engine
    always does) and their features are 0 otherwise.
    """

    def __init__(
        self,
        weights: str | os.PathLike | None = "default",
        *,
        net: GramL2ONet | None = None,
        guard: bool = True,
        margin: float = 0.5,
        max_ratio: float = 10.0,
    ) -> None:
        super().__init__()
        if not margin > 0:
            raise ValueError("GramL2O: margin must be > 0")
        if not max_ratio >= 1:
            raise ValueError("GramL2O: max_ratio must be >= 1")
        self.net = load_gram_network(weights) if net is None else net
        self.net.requires_grad_(False)
        self.guard = bool(guard)
        self.margin = float(margin)
        self.max_ratio = float(max_ratio)
        self.register_buffer("history", torch.zeros(0, self.net.state_width()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("accepted", torch.zeros((), dtype=torch.long))
        self.register_buffer("decisions", torch.zeros((), dtype=torch.long))
        #: Whether the last step took the learned weights (None before the first step).
        self.last_accepted: bool | None = None
        #: MGDA's weights at the last step (float64), for diagnostics.
        self.last_baseline_weights: Tensor | None = None

    @property
    def acceptance_rate(self) -> float | None:
        total = int(self.decisions)
        return None if total == 0 else int(self.accepted) / total

    def reset(self) -> None:
        """Forget the history (a new run)."""
        self.history = torch.zeros(0, self.net.state_width())
        self.steps.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        key = prefix + "history"
        if key in state_dict:  # sized by the run that saved it
            self.history = torch.zeros_like(state_dict[key], dtype=torch.float32)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def compute_weights(
        self, gram: Tensor, losses: Tensor | None, preference: Tensor | None
    ) -> Tensor:
        m = gram.shape[0]
        if tuple(self.history.shape) != (m, self.net.state_width()):
            if self.history.numel():
                warnings.warn(
                    f"GramL2O: the history was for {self.history.shape[0]} objectives, the call "
                    f"has {m}: starting a fresh history",
                    stacklevel=3,
                )
            self.history = self.net.fresh_history(m)
        if losses is not None:
            losses = torch.as_tensor(losses).detach()
            if losses.numel() != m or not torch.isfinite(losses).all():
                losses = None
        w, history, inputs = self.net.step(gram, losses, self.history.cpu())
        baseline = inputs["mgda"]
        self.last_baseline_weights = baseline
        taken = w
        if self.guard:
            ok = gram_accepts(gram, w, baseline, self.margin, self.max_ratio)
            self.last_accepted = ok
            self.decisions += 1
            self.accepted += int(ok)
            if not ok:
                taken = baseline
        history[:, -1] = taken.to(history.dtype)
        self.history = history.float()
        self.steps += 1
        return to_weights(np.asarray(taken.numpy(), dtype=np.float64), gram)

    def extra_repr(self) -> str:
        return f"guard={self.guard}, margin={self.margin}, max_ratio={self.max_ratio}"
