"""DARE: drop and rescale task vectors (Yu et al., ICML 2024), linear and TIES variants.

    τ̃_k = m_k ⊙ τ_k / p,    m_k ~ Bernoulli(p) entrywise,  p = ``density``

``dare_linear``:  θ(α) = θ_base + λ Σ_k α_k τ̃_k
``dare_ties``:    θ(α) = θ_base + λ · TIES sign consensus of the τ̃_k (see ``ties.py``)

``dare_ties`` does not divide by the agreeing models' weight by default (``normalize: false``,
as in mergekit, whose ``dare_ties`` leaves it off while its ``ties`` turns it on), so one config
gives the same formula in both tools. Where only some models agree with the elected sign, an
entry is then Σ_agreeing α_k τ̃_k, not their weighted mean; ``normalize: true`` gives the mean,
as ``ties`` does (and as align's ``dare_ties`` did by default before).

Rescaling differs from mergekit 0.1.5 by design: align divides each survivor by p, the paper's
rescale, which keeps every entry's expectation; mergekit multiplies the masked tensor by one
factor that restores its L1 norm (‖τ‖₁ / ‖m ⊙ τ‖₁ — about 1/p on a large tensor, but set by the
draw). The masks themselves come from different generators, so the two tools never agree entry
by entry on DARE; the tests check the drop rate and the rescale instead.

Dropping most of a fine-tuning delta at random and rescaling the rest by 1/p keeps its expected
value and, empirically, the fine-tuned behaviour, while making task vectors sparse and less
interfering. Masks are seeded per (``seed``, tensor name, model index), so the same options
always give the same model, whether streamed, merged in memory, or swept over α (a sweep uses
one mask per model for every α, as drawing new masks per α would add noise to the front).
"""

from __future__ import annotations

from torch import Tensor

from align.merging.base import (
    check_drop_options,
    check_fraction,
    drop_and_rescale_,
    sign_consensus,
    task_vectors,
    tensor_seed,
    weighted_sum,
)
from align.merging.engine import MergeMethod
from align.merging.registry import register_merge_method


class _Dare(MergeMethod):
    def check_options(self) -> None:
        self.params["density"] = check_fraction(self.params["density"], "density")
        check_drop_options(self.params)

    def prepare(self, name: str, tensors: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor]:
        density, seed = self.params["density"], self.params["seed"]
        rescale = self.params.get("rescale", True)
        tau = task_vectors(tensors, base)
        for k, row in enumerate(tau):
            drop_and_rescale_(row, density, tensor_seed(seed, name, k), rescale)
        return base, tau


@register_merge_method("dare_linear")
class DareLinear(_Dare):
    """DARE drop-and-rescale (seeded), then θ_base + λ Σ_k α_k τ̃_k."""

    options = {"density": 0.5, "lambda": 1.0, "seed": 0, "rescale": True}

    def apply(self, prepared: tuple[Tensor, Tensor], weights: Tensor) -> Tensor:
        base, tau = prepared
        return base + self.params["lambda"] * weighted_sum(weights, tau)


@register_merge_method("dare_ties")
class DareTies(_Dare):
    """DARE drop-and-rescale (seeded), then TIES sign election and disjoint merge."""

    options = {"density": 0.5, "lambda": 1.0, "seed": 0, "normalize": False}

    def apply(self, prepared: tuple[Tensor, Tensor], weights: Tensor) -> Tensor:
        base, tau = prepared
        merged = sign_consensus(weights, tau, normalize=self.params["normalize"])
        return base + self.params["lambda"] * merged
