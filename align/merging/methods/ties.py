"""TIES merging: trim, elect sign, disjoint merge (Yadav et al., NeurIPS 2023).

    τ̂_k = trim(θ_k − θ_base, density)             keep the top-``density`` fraction by magnitude
    γ   = sgn(Σ_k α_k τ̂_k)                         the elected sign, per entry
    θ(α) = θ_base + λ · Σ_{k: sgn τ̂_k = γ} α_k τ̂_k / Σ_{k: sgn τ̂_k = γ} α_k

Trimming removes the small, mostly noisy part of each task vector; sign election stops updates
of opposite signs from cancelling each other out. Dividing by the weight of the agreeing models
(``normalize``, default true) makes each entry a weighted mean, so at a vertex of the simplex the
merge is the base plus that model's trimmed task vector. Trimming does not depend on α and is
done once per tensor in a sweep. Entries whose magnitude ties with the k-th largest are all kept
(mergekit keeps exactly k, picking among ties by sort order); this matters only for deltas with
many equal magnitudes, such as a few Adam steps (≈ ±lr everywhere): on the fine-tuned SmolLM2
copies the two tools differ by at most 2.7e-4, on generic deltas by float round-off.
"""

from __future__ import annotations

from torch import Tensor

from align.merging.base import (
    check_bool,
    check_fraction,
    check_number,
    sign_consensus,
    task_vectors,
    trim_to_density_,
)
from align.merging.engine import MergeMethod
from align.merging.registry import register_merge_method


@register_merge_method("ties")
class Ties(MergeMethod):
    """Trim task vectors to the top ``density``, elect signs by α-weighted sum, merge agreeing."""

    options = {"density": 0.5, "lambda": 1.0, "normalize": True}

    def check_options(self) -> None:
        self.params["density"] = check_fraction(self.params["density"], "density")
        self.params["lambda"] = check_number(self.params["lambda"], "lambda")
        check_bool(self.params["normalize"], "normalize")

    def prepare(self, name: str, tensors: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor]:
        tau = task_vectors(tensors, base)
        for row in tau:  # one model at a time: temporaries of one tensor's size
            trim_to_density_(row, self.params["density"])
        return base, tau

    def apply(self, prepared: tuple[Tensor, Tensor], weights: Tensor) -> Tensor:
        base, tau = prepared
        merged = sign_consensus(weights, tau, normalize=self.params["normalize"])
        return base + self.params["lambda"] * merged
