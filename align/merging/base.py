"""What every merge is (:class:`Merge`), and the math the tensor-level methods share.

A tensor-level merge method (:class:`~align.merging.engine.MergeMethod`) combines, for one
tensor name, the K fine-tuned tensors ``θ_1 … θ_K`` (and the base tensor ``θ_base`` when the
method works on task vectors ``τ_k = θ_k − θ_base``) with the preference α (one weight per
model, on the simplex) into one tensor. That class lives with the streaming engine that runs
it (its ``run`` is the engine), so this module, the registry and the engine import one another
in one direction only.

The work is split in two so that a sweep over many α is cheap: ``MergeMethod.prepare``
does everything that does not depend on α once per tensor (task vectors, TIES trimming, DARE
drop masks), and ``MergeMethod.apply`` turns the prepared state and one α into the merged
tensor. Methods see float32 (float64 if an input is float64) tensors and return the same; the
engine casts to the output dtype.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor


class Merge(ABC):
    """Anything ``merge_method:`` can name: its options validated in the constructor, and
    :meth:`run` turning a parsed merge config into output folders.

    Tensor-level methods (:class:`~align.merging.engine.MergeMethod`: linear, TIES, DARE,
    SLERP ...) run through the streaming engine that defines them; LoRA interpolation and
    Pareto merging are merges of their own kind (:mod:`align.merging.lora`,
    :mod:`align.merging.pareto`). All of them are found through one registry, so ``align
    merge`` is a lookup and a call.
    """

    #: The registered name (set by :func:`align.merging.registry.register_merge_method`).
    name: ClassVar[str] = ""
    #: Option name → default; anything else given to the constructor is an error.
    options: ClassVar[Mapping[str, Any]] = {}
    #: Whether ``run`` trains an artifact from ``models`` (Pareto merging) rather than writing
    #: checkpoints for a preference or a sweep; such a merge also reads ``artifact:`` configs.
    trains_artifact: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(self.options) or "none"
            raise ValueError(
                f"merge method {self.name!r} does not take {', '.join(map(repr, unknown))}; "
                f"its options are: {allowed}"
            )
        self.params: dict[str, Any] = {**self.options, **options}
        self.check_options()

    def check_options(self) -> None:  # noqa: B027 — optional hook, not abstract
        """Validate ``self.params`` (override to add checks)."""

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({inner})"

    @abstractmethod
    def run(self, config: Any, out: Path, *, overwrite: bool = False) -> list[Path]:
        """Do what ``config`` (a :class:`~align.merging.config.MergeConfig`) asks; returns the
        folders written."""


# --- helpers shared by several methods ----------------------------------------------------------


def weighted_sum(weights: Tensor, stacked: Tensor) -> Tensor:
    """``Σ_k w_k X_k`` for ``stacked`` of shape ``(K, *shape)``, without a (K, *shape) temporary."""
    return torch.tensordot(weights.to(stacked.dtype), stacked, dims=1)


def check_fraction(value: Any, what: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number in (0, 1], got {value!r}")
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):
        raise ValueError(f"{what} must be in {'[0' if allow_zero else '(0'}, 1], got {value!r}")
    return float(value)


def check_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {value!r}")
    return value


def check_drop_options(params: dict[str, Any]) -> None:
    """What the random-drop methods (DARE, DELLA) share: λ a number, an integer seed, and the
    optional ``rescale`` / ``normalize`` flags true or false."""
    params["lambda"] = check_number(params["lambda"], "lambda")
    seed = params["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    for flag in ("rescale", "normalize"):
        if flag in params:
            check_bool(params[flag], flag)


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A stable 63-bit seed for (run seed, tensor name, model index).

    Derived by hashing, not by advancing one generator, so a tensor's random mask does not
    depend on which tensors were processed before it: a streamed merge, an in-memory merge and a
    sweep all draw the same masks.
    """
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def trim_to_density_(tau: Tensor, density: float) -> Tensor:
    """Keep the ``k = max(1, int(density · n))`` largest-magnitude entries of ``tau`` (in place).

    Entries tied with the k-th largest magnitude are all kept (exact ties are measure-zero for
    real fine-tuning deltas; zeros never matter since a zero contributes nothing).
    """
    if density >= 1 or tau.numel() == 0:
        return tau
    k = max(1, int(density * tau.numel()))
    magnitude = tau.abs().reshape(-1)
    # The k-th largest is the (n − k + 1)-th smallest; kthvalue is linear time, a sort is not.
    threshold = torch.kthvalue(magnitude, magnitude.numel() - k + 1).values
    tau.masked_fill_(magnitude.reshape(tau.shape) < threshold, 0)
    return tau


def drop_and_rescale_(tau: Tensor, density: float, seed: int, rescale: bool = True) -> Tensor:
    """DARE, in place: keep each entry with probability ``density`` (seeded), divide survivors
    by it. Rescaling by ``1/density`` keeps the expected task vector unchanged (Yu et al., 2024).
    """
    if density >= 1:
        return tau
    generator = torch.Generator().manual_seed(seed)
    tau.masked_fill_(torch.rand(tau.shape, generator=generator) >= density, 0)
    return tau.div_(density) if rescale else tau


def task_vectors(tensors: Tensor, base: Tensor) -> Tensor:
    """``τ_k = θ_k − θ_base`` as a new ``(K, *shape)`` tensor (the inputs are left untouched)."""
    return torch.sub(tensors, base)


def sign_consensus(weights: Tensor, tau: Tensor, *, normalize: bool = True) -> Tensor:
    """TIES' elect-and-disjoint-merge of (trimmed) task vectors ``tau`` (``(K, *shape)``).

    Elected sign per entry: ``γ = sgn(Σ_k w_k τ_k)`` (ties and zeros count as +). Only the task
    vectors that agree with γ take part: ``Σ_{k: sgn τ_k = γ} w_k τ_k``, divided, when
    ``normalize``, by ``Σ_{k: sgn τ_k = γ} w_k`` (a weighted mean over the agreeing models; 1
    where no model agrees). A zero entry has sign 0 and never agrees.

    Models are visited one at a time, so the temporaries are a few tensors of one model's size,
    not K of them (this is what bounds the memory of TIES on an embedding matrix).
    """
    weights = weights.to(tau.dtype)
    positive = weighted_sum(weights, tau) >= 0  # the elected sign is + here
    merged = torch.zeros_like(tau[0])
    divisor = torch.zeros_like(tau[0]) if normalize else None
    for k in range(tau.shape[0]):
        agree = torch.where(positive, tau[k] > 0, tau[k] < 0)
        merged.add_(torch.where(agree, tau[k], 0), alpha=float(weights[k]))
        if divisor is not None:
            divisor.add_(agree, alpha=float(weights[k]))
        del agree
    if divisor is None:
        return merged
    return merged.div_(divisor.masked_fill_(divisor == 0, 1))
