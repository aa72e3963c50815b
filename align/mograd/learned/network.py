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


#: LSTMCell's gate rows are (i, f, g, o); the inference path reorders them to (i, f, o, g).
def _gate_order(hidden: int) -> Tensor:
    return torch.cat(
        [torch.arange(0, 2 * hidden), torch.arange(3 * hidden, 4 * hidden)]
        + [torch.arange(2 * hidden, 3 * hidden)]
    )


def _packed(cell: nn.LSTMCell) -> tuple[Tensor, Tensor]:
    """``([W_ih | W_hh] (4H, in + H), b_ih + b_hh (4H, 1))`` with the gates reordered to
    (i, f, o, g) and the g rows doubled (exact in floating point): one matmul over ``[x; h]``
    gives all four pre-activations, and one sigmoid pass all four gates, since
    ``tanh(z) = 2 σ(2z) − 1`` (a sigmoid costs a third of a tanh on a CPU)."""
    hidden = cell.hidden_size
    order = _gate_order(hidden).to(cell.weight_ih.device)
    weight = torch.cat([cell.weight_ih, cell.weight_hh], dim=1)[order]
    bias = (cell.bias_ih + cell.bias_hh)[order].unsqueeze(1)
    weight[3 * hidden :] *= 2
    bias[3 * hidden :] *= 2
    return weight.detach().contiguous(), bias.detach().contiguous()


class _Runner:
    """The inference path of :meth:`ML2ONet.step` (no autograd): the same network, computed
    feature-major (every per-coordinate vector a contiguous row of n numbers) in buffers
    allocated once and reused for every chunk, so that each gate nonlinearity is one pass over
    a contiguous block and nothing is allocated per chunk.

    Layout for a chunk of n coordinates (H = specific, K = shared hidden size):

    * ``x`` (2 + H, m, n): the specific modules' input ``[enc(u) (2) ; h_spec (H)]`` — one
      matmul ``[W_ih | W_hh] @ x`` gives the gates of all m modules when they are tied (one per
      objective otherwise); the new ``h_spec`` is written back into ``x[2:]``;
    * ``gates`` (4H, m, n) in the order (i, f, o, g), ``cell`` (H, m, n);
    * ``shared_x`` (2H + 4 + K, n): ``[mean_i h_i ; max_i h_i ; enc(d*/s) ; enc(ḡ/s) ; h]``,
      ``shared_gates`` (4K, n), ``shared_cell`` (K, n).

    The recurrent state stays the ``(n, state_size)`` rows of :meth:`ML2ONet.step` in any
    storage dtype: it is read into (and written back from) these buffers by transposing copies.
    """

    def __init__(self, net: ML2ONet, m: int, capacity: int, device: torch.device) -> None:
        net.check_objectives(m)
        self.m, self.capacity = m, int(capacity)
        self.hs, self.hh = net.specific_hidden, net.shared_hidden
        dtype = net.head.weight.dtype
        kwargs = {"dtype": dtype, "device": device}
        packed = [_packed(cell) for cell in net.specific]
        self.specific = packed * m if net.tie_specific else packed
        self.tied = net.tie_specific
        self.shared = _packed(net.shared)
        self.head_weight = net.head.weight.detach().reshape(-1).to(**kwargs)
        self.head_bias = float(net.head.bias.detach())
        self.gains = [float(g) for g in net.gains.detach()]
        hs, hh, n = self.hs, self.hh, self.capacity
        sizes = {
            "x": (2 + hs) * m,
            "gates": 4 * hs * m,
            "cell": hs * m,
            "shared_x": 2 * hs + 4 + hh,
            "shared_gates": 4 * hh,
            "shared_cell": hh,
            "out": 1,
        }
        self.flat = {name: torch.empty(size * n, **kwargs) for name, size in sizes.items()}

    def _views(self, n: int) -> dict[str, Tensor]:
        m, hs, hh = self.m, self.hs, self.hh
        shapes = {
            "x": (2 + hs, m, n),
            "gates": (4 * hs, m, n),
            "cell": (hs, m, n),
            "shared_x": (2 * hs + 4 + hh, n),
            "shared_gates": (4 * hh, n),
            "shared_cell": (hh, n),
            "out": (n,),
        }
        return {
            name: self.flat[name][: math.prod(shape)].view(shape) for name, shape in shapes.items()
        }

    @staticmethod
    def _encode_into(values: Tensor, magnitude: Tensor, sign: Tensor) -> None:
        """:func:`encode` written into two given tensors."""
        torch.abs(values, out=magnitude)
        magnitude.clamp_min_(math.exp(-LOG_P)).log_().div_(LOG_P).clamp_(-1.0, 1.0)
        torch.mul(values, math.exp(LOG_P), out=sign).clamp_(-1.0, 1.0)

    @staticmethod
    def _lstm(gates: Tensor, cell: Tensor, hidden_out: Tensor, size: int) -> None:
        """The LSTM update on the pre-activations (i, f, o, 2g) of :func:`_packed`:
        ``c ← σ(f) c + σ(i) tanh(g)``, ``h ← σ(o) tanh(c)``, every tanh as ``2 σ(2z) − 1``
        (in place; ``h`` into ``hidden_out``)."""
        gates.sigmoid_()
        g = gates[3 * size :].mul_(2.0).sub_(1.0)
        cell.mul_(gates[size : 2 * size]).addcmul_(gates[:size], g)
        torch.mul(cell, 2.0, out=hidden_out).sigmoid_().mul_(2.0).sub_(1.0)
        hidden_out.mul_(gates[2 * size : 3 * size])

    def step(
        self, u: Tensor, mgda: Tensor, mean: Tensor, state: Tensor | None, new_state: Tensor
    ) -> Tensor:
        """:meth:`ML2ONet.step` on n ≤ capacity coordinates: reads ``state`` (or zeros), writes
        the new state into ``new_state`` (``(n, state_size)``, any dtype; it may be ``state``
        itself) and returns ``out`` (n,) — a view of a reused buffer, valid until the next call.
        """
        m, hs, hh = self.m, self.hs, self.hh
        n = u.shape[1]
        if u.shape[0] != m or n > self.capacity:
            raise ValueError(f"_Runner: got {tuple(u.shape)} for m={m}, capacity={self.capacity}")
        v = self._views(n)
        x, gates, cell = v["x"], v["gates"], v["cell"]
        sx, sgates, scell, out = v["shared_x"], v["shared_gates"], v["shared_cell"], v["out"]
        h_spec, h_sh = x[2:], sx[2 * hs + 4 :]
        spec = 2 * m * hs
        if state is None:
            h_spec.zero_(), cell.zero_(), h_sh.zero_(), scell.zero_()
        else:  # (n, state) rows -> feature-major columns (h_spec column i·H + k -> [k, i])
            h_spec.copy_(state[:, : m * hs].t().view(m, hs, n).transpose(0, 1))
            cell.copy_(state[:, m * hs : spec].t().view(m, hs, n).transpose(0, 1))
            h_sh.copy_(state[:, spec : spec + hh].t())
            scell.copy_(state[:, spec + hh :].t())
        self._encode_into(u, x[0], x[1])
        # Specific modules: all four gates of all m modules from one matmul (tied weights).
        if self.tied:
            weight, bias = self.specific[0]
            torch.addmm(bias, weight, x.view(2 + hs, m * n), out=gates.view(4 * hs, m * n))
        else:
            for i, (weight, bias) in enumerate(self.specific):
                torch.addmm(bias, weight, x[:, i], out=gates[:, i])
        self._lstm(gates, cell, h_spec, hs)
        # Shared module: symmetric pooling over the objectives plus the reference directions.
        torch.mean(h_spec, dim=1, out=sx[:hs])
        torch.amax(h_spec, dim=1, out=sx[hs : 2 * hs])
        self._encode_into(mgda, sx[2 * hs], sx[2 * hs + 1])
        self._encode_into(mean, sx[2 * hs + 2], sx[2 * hs + 3])
        weight, bias = self.shared
        torch.addmm(bias, weight, sx, out=sgates)
        self._lstm(sgates, scell, h_sh, hh)
        # Head: a · d*/s + b · ḡ/s + wᵀh + c.
        torch.mul(mgda, self.gains[0], out=out).add_(mean, alpha=self.gains[1])
        out.addmv_(h_sh.t(), self.head_weight).add_(self.head_bias)
        # The new state, back to (n, state) rows in the storage dtype.
        new_state[:, : m * hs].t().view(m, hs, n).transpose(0, 1).copy_(h_spec)
        new_state[:, m * hs : spec].t().view(m, hs, n).transpose(0, 1).copy_(cell)
        new_state[:, spec : spec + hh].t().copy_(h_sh)
        new_state[:, spec + hh :].t().copy_(scell)
        return out


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

    def runner(self, m: int, capacity: int, device: torch.device | str = "cpu") -> _Runner:
        """The inference path (no autograd) for chunks of at most ``capacity`` coordinates:
        ``runner.step(u, mgda, mean, state, new_state)`` computes what :meth:`step` computes
        (up to float rounding) with buffers reused across chunks. It copies the weights when
        made: make a new one after they change. :meth:`step` stays the differentiable one."""
        return _Runner(self, m, capacity, torch.device(device))

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
