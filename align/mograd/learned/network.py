"""The coordinate-wise ML2O network and its scale-free gradient preprocessing.

Every coordinate j of the P parameters is processed independently by the same small network
(Andrychowicz et al., 2016, "Learning to learn by gradient descent by gradient descent"), so it
applies to any P; its recurrent state is kept per coordinate.

Per coordinate and step, with ``g_ij`` the gradient of objective i:

1. **scale-free inputs** — objective i's gradient is divided by its own RMS over the
   coordinates, ``u_ij = g_ij / r_i`` (``r_i = ‖g_i‖ / √P``): the inputs do not change when an
   objective is multiplied by any c > 0. Each value is then encoded as Andrychowicz et al.'s
   two features ``(clamp(log|u| / p, −1, 1), clamp(e^p u, −1, 1))`` (log-magnitude and sign,
   continuous at |u| = e^{−p}; p = 10).
2. **specific modules** — one LSTM per objective reads ``enc(u_ij)`` and keeps its own state
   ``(h_ij, c_ij)``. By default the m modules share their weights (``tie_specific=True``): the
   objectives of a multi-objective problem have no canonical order, and tying makes the
   network permutation-equivariant and usable for any m. ``tie_specific=False`` gives m
   separate modules, as written in the paper, for a fixed m.
3. **shared module** — one LSTM reads the mean and the max over objectives of the specific
   modules' outputs (symmetric pooling, any m), plus the encodings of two reference directions
   at coordinate j: the MGDA min-norm direction ``d*`` and the mean gradient ``ḡ``, both
   divided by ``s`` = the RMS of J.
4. **head** — ``out_j = a · d*_j / s + b · ḡ_j / s + wᵀ h_j + c``: a linear head on the shared
   state plus two learned gains on the reference directions; the update is ``d_j = s · out_j``.
   Initialised with a = 1, b = 0 and a zero head, an untrained network *is* MGDA; meta-training
   learns how far to move from it. ``d`` is 1-homogeneous in J (scaling every gradient by c
   scales the update by c), the units of a gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from align.mograd.aggregators.solvers import as_float64, min_norm_weights

#: Andrychowicz et al.'s preprocessing constant: magnitudes below e^{-p} are "zero".
LOG_P = 10.0


def encode(values: Tensor, p: float = LOG_P) -> Tensor:
    """``(...,) -> (..., 2)``: log-magnitude and sign features of (already normalised) values.

    ``(clamp(log|v| / p, −1, 1), clamp(e^p v, −1, 1))``: for |v| ≥ e^{−p} the second feature is
    the sign, below it the value itself scaled up, so the encoding is continuous.
    """
    magnitude = torch.log(values.abs().clamp_min(math.exp(-p))) / p
    return torch.stack([magnitude.clamp(-1.0, 1.0), (values * math.exp(p)).clamp(-1.0, 1.0)], -1)


def rms_scales(jacobian: Tensor) -> tuple[Tensor, Tensor]:
    """``(r (m,), s ())``: each objective's gradient RMS over the coordinates (1 where a gradient
    is exactly zero, so it stays zero) and the RMS of the whole Jacobian."""
    square = jacobian.double().square().mean(dim=1)
    r = square.sqrt()
    s = square.mean().sqrt()
    return torch.where(r > 0, r, torch.ones_like(r)), s


def normalised_gradients(jacobian: Tensor) -> Tensor:
    """``u_ij = g_ij / r_i``: every objective's gradient at unit RMS (scale-free inputs)."""
    r, _ = rms_scales(jacobian)
    return jacobian / r.to(jacobian).unsqueeze(1)


def network_inputs(
    jacobian: Tensor, gram: Tensor | None = None, total: int | None = None
) -> dict[str, Tensor]:
    """Everything the network reads, from ``J (m, P)`` (detached, float32):

    ``u`` (m, P) the normalised gradients, ``mgda`` / ``mean`` (P,) the MGDA direction and the
    mean gradient over ``scale`` = s (the RMS of J, a 0-d tensor), and ``baseline`` (P,) the MGDA
    direction itself with its ``baseline_weights`` (m,) and the ``gram`` (m, m, float64).

    Sharded (ZeRO-1/2): ``jacobian`` is this rank's columns, ``gram`` the Gram of the *full*
    Jacobian (the all-reduced sum of the shard Grams) and ``total`` the full P; every scale then
    comes from the Gram (``r_i² = G_ii / P``, ``s² = tr G / (m P)``), the same on every rank, and
    the per-coordinate inputs are those of the full J at this rank's coordinates.
    """
    jacobian = jacobian.detach().float()
    if gram is None:
        gram = (jacobian @ jacobian.T).double()
        r, s = rms_scales(jacobian)
    else:
        gram = gram.double()
        square = gram.diagonal().clamp_min(0).cpu() / max(int(total), 1)
        r, s = square.sqrt(), square.mean().sqrt()
        r = torch.where(r > 0, r, torch.ones_like(r))
        r, s = r.to(jacobian.device), s.to(jacobian.device)
    weights = torch.as_tensor(min_norm_weights(as_float64(gram)), dtype=torch.float64)
    baseline = weights.to(jacobian) @ jacobian
    s32 = float(s) if float(s) > 0 else 1.0
    return {
        "u": jacobian / r.to(jacobian).unsqueeze(1),
        "mgda": baseline / s32,
        "mean": jacobian.mean(0) / s32,
        "scale": s.float(),
        "baseline": baseline,
        "baseline_weights": weights,
        "gram": gram,
    }


class ML2ONet(nn.Module):
    """The coordinate-wise learned optimizer (see the module docstring).

    Args:
        specific_hidden: hidden size of each objective's LSTM specific module.
        shared_hidden: hidden size of the shared LSTM module.
        tie_specific: share the specific modules' weights across objectives (any m).
        num_objectives: the fixed m when ``tie_specific=False``.

    :meth:`step` works on one chunk of coordinates; its state is one ``(n, state_size(m))``
    tensor per chunk: ``[h_spec (m·Hs) | c_spec (m·Hs) | h_shared (H) | c_shared (H)]``.
    """

    def __init__(
        self,
        specific_hidden: int = 8,
        shared_hidden: int = 16,
        *,
        tie_specific: bool = True,
        num_objectives: int | None = None,
    ) -> None:
        super().__init__()
        if specific_hidden < 1 or shared_hidden < 1:
            raise ValueError("ML2ONet: hidden sizes must be >= 1")
        if not tie_specific and not (isinstance(num_objectives, int) and num_objectives >= 1):
            raise ValueError("ML2ONet: tie_specific=False needs num_objectives (the fixed m)")
        self.specific_hidden = int(specific_hidden)
        self.shared_hidden = int(shared_hidden)
        self.tie_specific = bool(tie_specific)
        self.num_objectives = None if tie_specific else int(num_objectives)
        modules = 1 if tie_specific else self.num_objectives
        self.specific = nn.ModuleList(nn.LSTMCell(2, specific_hidden) for _ in range(modules))
        self.shared = nn.LSTMCell(2 * specific_hidden + 4, shared_hidden)
        self.head = nn.Linear(shared_hidden, 1)
        self.gains = nn.Parameter(torch.tensor([1.0, 0.0]))  # a (on d*), b (on ḡ)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    # ------------------------------------------------------------------------- config
    def config(self) -> dict[str, Any]:
        return {
            "specific_hidden": self.specific_hidden,
            "shared_hidden": self.shared_hidden,
            "tie_specific": self.tie_specific,
            "num_objectives": self.num_objectives,
        }

    def state_size(self, m: int) -> int:
        return 2 * m * self.specific_hidden + 2 * self.shared_hidden

    def check_objectives(self, m: int) -> None:
        if not self.tie_specific and m != self.num_objectives:
            raise ValueError(
                f"this ML2O network has {self.num_objectives} separate specific modules "
                f"(tie_specific=False) and cannot take {m} objectives"
            )

    # --------------------------------------------------------------------------- step
    def step(
        self, u: Tensor, mgda: Tensor, mean: Tensor, state: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """One step on n coordinates.

        Args:
            u: ``(m, n)`` normalised per-objective gradients ``g_ij / r_i``.
            mgda: ``(n,)`` the MGDA direction over ``s``; mean: ``(n,)`` ``ḡ / s``.
            state: ``(n, state_size(m))`` or None (zeros: a fresh trajectory).

        Returns ``(out (n,), new_state)``; the update is ``s · out``.
        """
        m, n = u.shape
        self.check_objectives(m)
        hs, hh = self.specific_hidden, self.shared_hidden
        dtype = self.head.weight.dtype
        if state is None:
            state = torch.zeros(n, self.state_size(m), dtype=dtype, device=u.device)
        state = state.to(dtype)
        h_spec = state[:, : m * hs].reshape(n, m, hs).transpose(0, 1)
        c_spec = state[:, m * hs : 2 * m * hs].reshape(n, m, hs).transpose(0, 1)
        h_sh = state[:, 2 * m * hs : 2 * m * hs + hh]
        c_sh = state[:, 2 * m * hs + hh :]
        features = encode(u.to(dtype))  # (m, n, 2)
        if self.tie_specific:
            cell = self.specific[0]
            h_new, c_new = cell(
                features.reshape(m * n, 2),
                (h_spec.reshape(m * n, hs), c_spec.reshape(m * n, hs)),
            )
            h_new, c_new = h_new.reshape(m, n, hs), c_new.reshape(m, n, hs)
        else:
            pairs = [
                cell(features[i], (h_spec[i], c_spec[i])) for i, cell in enumerate(self.specific)
            ]
            h_new = torch.stack([h for h, _ in pairs])
            c_new = torch.stack([c for _, c in pairs])
        mgda, mean = mgda.to(dtype), mean.to(dtype)
        shared_in = torch.cat(
            [h_new.mean(0), h_new.amax(0), encode(mgda), encode(mean)], dim=1
        )  # (n, 2 hs + 4)
        h_sh, c_sh = self.shared(shared_in, (h_sh, c_sh))
        out = self.gains[0] * mgda + self.gains[1] * mean + self.head(h_sh).squeeze(1)
        new_state = torch.cat(
            [
                h_new.transpose(0, 1).reshape(n, m * hs),
                c_new.transpose(0, 1).reshape(n, m * hs),
                h_sh,
                c_sh,
            ],
            dim=1,
        )
        return out, new_state
