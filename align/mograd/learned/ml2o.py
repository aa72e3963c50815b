"""ML2O: multi-gradient learning to optimize (Yang, Tang & Yang, arXiv 2311.00559).

A learned, coordinate-wise map from the m per-objective gradients (and, through per-coordinate
LSTM state, their history) to the update; the network is :class:`~.network.ML2ONet`, its
default weights ship in ``align/mograd/learned/weights/`` (see ``CARD.md`` there).

How the update meets the trainer's optimizer: ML2O returns a *direction in gradient units*
(``d = s · out``, s = the RMS of J; an untrained network returns exactly MGDA's direction),
which the engine injects as the gradient. The outer optimizer (SGD with the run's learning rate
and schedule, AdamW, clipping ...) scales and applies it exactly as it would any aggregator's
direction, so ``aggregator: ml2o`` drops into a recipe with nothing else changed. The network
was meta-trained with the direction applied by plain SGD steps ``x ← x − η d`` (η per problem);
under Adam its per-coordinate magnitudes are renormalised, and only its signs and relative
sizes over time matter.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from align.mograd.base import UpdateAggregator
from align.mograd.learned.network import ML2ONet, network_inputs
from align.mograd.learned.weights_file import (
    load_weights,
    save_weights,
    shipped_weights,
    weights_info,
)
from align.mograd.registry import register_aggregator

DEFAULT_WEIGHTS = "ml2o_default.safetensors"
_STATE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_weights_path() -> Path:
    """The shipped weights (``align/mograd/learned/weights/ml2o_default.safetensors``)."""
    return shipped_weights(DEFAULT_WEIGHTS)


def save_network(net: ML2ONet, path: str | os.PathLike, **info: Any) -> Path:
    """Write ``net`` as safetensors; its config and ``info`` (JSON-able) go in the metadata."""
    return save_weights(net, path, **info)


def load_network(source: str | os.PathLike | ML2ONet | None = "default") -> ML2ONet:
    """An :class:`ML2ONet`: ``"default"`` (the shipped weights), a safetensors path written by
    :func:`save_network`, a network (returned as is), or None (untrained: exactly MGDA)."""
    return load_weights(
        ML2ONet,
        source,
        default_weights_path(),
        "train them with `python -m lab.meta_training recipes/ml2o_meta.yaml` or "
        "pass weights=None for the untrained (MGDA-equivalent) network",
    )


def network_info(source: str | os.PathLike = "default") -> dict[str, Any]:
    """The ``info`` metadata stored with the weights (what they were trained on, how long)."""
    return weights_info(source, default_weights_path())


def _state_zeros(size: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zero state of shape ``(size, width)`` stored feature-major (the transpose of a
    contiguous ``(width, size)`` tensor): row j is still coordinate j's state, and each state
    component is a contiguous run over the coordinates, which the network reads and writes
    without transposing."""
    return torch.zeros(width, size, dtype=dtype, device=device).t()


def span_weights(jacobian: Tensor, gram: Tensor, direction: Tensor) -> Tensor:
    """The coefficients w of the projection of ``direction`` onto the span of the gradients
    (``Jᵀw`` closest to d): ML2O's "weights" for logging (float64, (m,))."""
    return gram_lstsq(gram, jacobian.double() @ direction.double())


def gram_lstsq(gram: Tensor, target: Tensor) -> Tensor:
    """``G w = J d`` in the least-squares sense (float64, on the CPU)."""
    solution = torch.linalg.lstsq(
        gram.double().cpu(), target.double().cpu().unsqueeze(1), driver="gelsd"
    )
    return solution.solution.squeeze(1)


@register_aggregator("ml2o")
class ML2O(UpdateAggregator):
    """The learned multi-gradient optimizer; ``aggregator(J (m, P)) -> d (P,)``.

    Args:
        weights: ``"default"`` (shipped), a path to saved weights, or None (an untrained
            network, which returns exactly the MGDA direction).
        net: an :class:`ML2ONet` to use instead of ``weights`` (tests, meta-training).
        state_dtype: storage of the per-coordinate recurrent state, ``"float16"`` (default:
            2 bytes per number; computed in float32 chunk by chunk), ``"bfloat16"`` or
            ``"float32"``. State size: ``(2·m·Hs + 2·H)`` numbers per coordinate — 64 for
            m = 2 with the default Hs = 8, H = 16, i.e. 128 bytes per parameter in float16.
        chunk_size: coordinates processed at once (bounds the network's buffers: about 870
            bytes per coordinate for m = 2; 16384 was the fastest of 4k–64k measured here).

    The recurrent state (``hidden``, shape (P, state size); stored feature-major, as the
    transpose of a contiguous (state size, P) tensor, so the network reads and writes it
    without transposing) and the step counter (calls) are buffers:
    ``state_dict`` / ``load_state_dict`` save and restore them (a checkpoint resumes with the
    same next update). A call with a different (m, P) than the state's starts a fresh state.
    The network's parameters are frozen (``requires_grad=False``): the trainers' optimizer
    does not pick them up.
    """

    def __init__(
        self,
        weights: str | os.PathLike | None = "default",
        *,
        net: ML2ONet | None = None,
        state_dtype: str = "float16",
        chunk_size: int = 16384,
    ) -> None:
        super().__init__()
        if state_dtype not in _STATE_DTYPES:
            raise ValueError(f"ML2O: state_dtype must be one of {list(_STATE_DTYPES)}")
        if int(chunk_size) < 1:
            raise ValueError("ML2O: chunk_size must be >= 1")
        self.net = load_network(weights) if net is None else net
        self.net.requires_grad_(False)
        self.state_dtype = state_dtype
        self.chunk_size = int(chunk_size)
        self.register_buffer("hidden", torch.zeros(0, 0, dtype=_STATE_DTYPES[state_dtype]))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        #: The MGDA direction of the last call (float32, detached), for guards and diagnostics.
        self.last_baseline: Tensor | None = None
        #: A state-sized tensor that :meth:`propose` may write a candidate into (GML2O hands
        #: back the one it does not keep), so that a guarded step does not allocate and
        #: fault in a new state every call. Not saved.
        self._spare: Tensor | None = None

    # ------------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the gradient history (a new trajectory)."""
        self.hidden = torch.zeros(0, 0, dtype=_STATE_DTYPES[self.state_dtype])
        self.steps.zero_()
        self._spare = None

    def _ensure_state(self, m: int, size: int, device: torch.device) -> None:
        width = self.net.state_size(m)
        if tuple(self.hidden.shape) != (size, width):
            if self.hidden.numel():
                warnings.warn(
                    f"ML2O: the state was for shape {tuple(self.hidden.shape)}, the call needs "
                    f"({size}, {width}) (other parameters or number of objectives): starting a "
                    f"fresh state",
                    stacklevel=3,
                )
            self.hidden = _state_zeros(size, width, _STATE_DTYPES[self.state_dtype], device)
            self.steps.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # The state's shape is only known once a run has started: size the buffer to match.
        key = prefix + "hidden"
        if key in state_dict:  # any layout (older checkpoints: row-major) -> feature-major
            size, width = state_dict[key].shape
            self.hidden = _state_zeros(
                size, width, _STATE_DTYPES[self.state_dtype], self.hidden.device
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------------- update
    @torch.no_grad()
    def propose(
        self,
        jacobian: Tensor,
        *,
        commit: bool = True,
        gram: Tensor | None = None,
        total: int | None = None,
    ) -> dict[str, Tensor]:
        """The learned update with what it was built from: ``update`` (P,), ``baseline`` (the
        MGDA direction d*), ``baseline_weights`` (m,), ``gram`` (m, m, float64) and ``state``,
        the recurrent state after this step.

        ``commit=True`` advances the state in place (``state`` is ``self.hidden``);
        ``commit=False`` writes the candidate state into another tensor (a new one, or the spare
        GML2O hands back) and leaves ``self.hidden`` as it was, for :meth:`commit` to install
        (GML2O commits it only when the learned step is taken). The candidate costs a second
        copy of the state; GML2O keeps the one it does not install as the next call's
        candidate buffer (no allocation and page faults per step, the same peak memory, but
        two copies held between steps too).

        Sharded (ZeRO-1/2, :meth:`compute_update_sharded`): ``jacobian`` holds this rank's
        coordinates, ``gram`` is the full Jacobian's Gram and ``total`` the full P; the state
        is this rank's partition (one row per local coordinate).
        """
        m, size = jacobian.shape
        self.net.check_objectives(m)
        device = jacobian.device
        if self.net.head.weight.device != device:
            self.net.to(device)
        inputs = network_inputs(jacobian, gram, total)
        self.last_baseline = inputs["baseline"]
        self._ensure_state(m, size, device)
        update = torch.zeros(size, dtype=torch.float32, device=device)
        scale = float(inputs["scale"])
        target = self.hidden
        if scale > 0:  # all-zero gradients: a zero update, the state left as it was
            if not commit:
                target = self._take_spare()
            u, reference, mean = inputs["u"], inputs["mgda"], inputs["mean"]
            # The network's inference path: buffers reused across the chunks, the state read
            # from ``self.hidden`` and written into ``target`` chunk by chunk.
            runner = self.net.runner(m, min(self.chunk_size, size), device)
            for start in range(0, size, self.chunk_size):
                part = slice(start, start + self.chunk_size)
                out = runner.step(
                    u[:, part], reference[part], mean[part], self.hidden[part], target[part]
                )
                torch.mul(out.float(), scale, out=update[part])
        self.steps += 1  # calls, whether or not the state advanced
        return {
            "update": update,
            "baseline": inputs["baseline"],
            "baseline_weights": inputs["baseline_weights"],
            "gram": inputs["gram"],
            "state": target,
        }

    def _take_spare(self) -> Tensor:
        """A tensor laid out like ``self.hidden`` for a candidate state (the spare if it fits)."""
        spare, self._spare = self._spare, None
        hidden = self.hidden
        if (
            spare is not None
            and spare.shape == hidden.shape
            and spare.stride() == hidden.stride()
            and spare.dtype == hidden.dtype
            and spare.device == hidden.device
            and spare.data_ptr() != hidden.data_ptr()
        ):
            return spare
        return torch.empty_like(hidden)

    def commit(self, proposal: dict[str, Tensor]) -> None:
        """Install the candidate state of ``propose(..., commit=False)``."""
        self.hidden = proposal["state"]

    def compute_update(
        self, jacobian: Tensor, losses: Tensor | None, preference: Tensor | None
    ) -> Tensor:
        proposal = self.propose(jacobian)
        self.last_weights = span_weights(jacobian, proposal["gram"], proposal["update"])
        return proposal["update"].to(jacobian.dtype)

    @torch.no_grad()
    def compute_update_sharded(
        self, jacobian: Tensor, gram: Tensor, total: int, all_reduce: Callable[[Tensor], Tensor]
    ) -> Tensor:
        """This rank's part of the update under ZeRO-1/2: the network on this rank's
        coordinates with this rank's partition of the state; ``gram`` is the full Jacobian's
        (already all-reduced), ``all_reduce`` sums a tensor over the ranks in place (used for
        the m inner products ``J d`` of the logged weights; GML2O's guard adds ``‖d‖²``)."""
        proposal = self.propose(jacobian, gram=gram, total=total)
        inner = all_reduce(jacobian.double() @ proposal["update"].double())
        self.last_weights = gram_lstsq(proposal["gram"], inner)
        return proposal["update"].to(jacobian.dtype)

    def extra_repr(self) -> str:
        return f"state_dtype={self.state_dtype}, chunk_size={self.chunk_size}"
