"""α for a training step, drawn so that every process and every resumed run draws the same.

α ~ Dirichlet(p·1) with a generator seeded by ``(seed, global_step, micro-step)``: the processes
of a distributed run agree without communicating, a run resumed from a checkpoint draws what the
uninterrupted run drew, and there is no sampler state to save.
"""

from __future__ import annotations

import numpy as np
import torch

from align.preference import sample_preferences


def step_preference(
    seed: int,
    step: int,
    micro_step: int,
    objectives: int,
    pairs: int | None = None,
    *,
    concentration: float = 1.0,
) -> torch.Tensor:
    """α of micro-step ``micro_step`` of optimizer step ``step``: ``(objectives,)``, or
    ``(pairs, objectives)`` (one per pair) when ``pairs`` is given; float32."""
    rng = np.random.default_rng([seed, step, micro_step])
    return sample_preferences(objectives, pairs, concentration=concentration, generator=rng).float()


class MicroStepCounter:
    """Which micro-step of the current optimizer step the next draw is (it restarts at 0 when
    the step changes): the one piece of α state, and it is rebuilt, not saved."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """Forget the current step: the next draw is micro-step 0 of whatever step it is."""
        self.step, self.micro_step = -1, 0

    def next(self, step: int) -> int:
        """The micro-step index of a draw made at optimizer step ``step``."""
        if step != self.step:
            self.step, self.micro_step = step, 0
        self.micro_step += 1
        return self.micro_step - 1
