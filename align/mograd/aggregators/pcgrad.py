"""PCGrad: project away the conflicting part of each gradient, then sum.

Yu et al. (NeurIPS 2020), "Gradient surgery for multi-task learning", Algorithm 1.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from align.mograd.aggregators.solvers import as_float64, normalised, to_weights
from align.mograd.base import GradientAggregator
from align.mograd.registry import register_aggregator

_ORDERS = ("random", "index")


@register_aggregator("pcgrad")
class PCGrad(GradientAggregator):
    """For each i: ``g_i^PC ← g_i``, then for each j ≠ i in some order, if ``g_i^PC · g_j < 0``,
    ``g_i^PC ← g_i^PC − (g_i^PC · g_j / ‖g_j‖²) g_j``; the update is ``d = Σ_i g_i^PC`` (a sum, as
    in the paper and torchjd).

    Every ``g_i^PC`` stays a combination of the g_j, so the whole surgery runs on the Gram: the
    weights ``c`` of ``g_i^PC = Σ_j c_j g_j`` are updated by ``c_j −= (G c)_j / G_jj``.

    Args:
        order: "random" (default, the paper's): for each i, a fresh random permutation of the
            objectives, drawn from this instance's own generator seeded with ``seed`` — so it is
            reproducible, identical on every data-parallel rank (they must agree on the update),
            and saved in ``state_dict`` for resumption. It draws exactly like torchjd's
            ``PCGradWeighting``, so with ``torch.manual_seed(seed)`` the two agree. "index": the
            fixed order 0, 1, …, m−1 (deterministic, no state). Neither order makes PCGrad
            invariant to permuting the objectives when m ≥ 3; for m = 2 the order is moot.
        seed: the generator's seed for ``order="random"``.
    """

    def __init__(self, order: str = "random", seed: int = 0) -> None:
        super().__init__()
        if order not in _ORDERS:
            raise ValueError(f"PCGrad: order must be one of {_ORDERS}")
        self.order = order
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)

    def compute_weights(
        self, gram: Tensor, losses: Tensor | None, preference: Tensor | None
    ) -> Tensor:
        g, _ = normalised(as_float64(gram))  # weights are invariant to scaling G
        m = g.shape[0]
        total = np.zeros(m)
        for i in range(m):
            if self.order == "random":
                others = torch.randperm(m, generator=self._generator).tolist()
            else:
                others = range(m)
            c = np.zeros(m)
            c[i] = 1.0
            for j in others:
                # A zero gradient conflicts with nothing; an underflowed (subnormal) ‖g_j‖² would
                # turn the division below into rounding noise.
                if j == i or g[j, j] <= np.finfo(np.float64).tiny:
                    continue
                inner = g[j] @ c
                if inner < 0:
                    c[j] -= inner / g[j, j]
            total += c
        return to_weights(total, gram)

    def get_extra_state(self) -> dict:
        return {"generator": self._generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self._generator.set_state(state["generator"])
