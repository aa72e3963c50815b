"""Meta-training of the ML2O network: truncated back-propagation through optimisation runs.

One *trajectory*: draw a problem (:func:`~.problems.sample_problem`), start at ``x_0``, and
apply the learned optimizer for ``unroll`` steps, ``x_{t+1} = Π(x_t − η d_t)`` (Π the problem's
projection, η its step size, ``d_t`` the network's direction from the per-objective gradients
at ``x_t``, on a mini-batch where the problem has data).

**Meta-loss** (per truncation segment of ``truncation`` steps)::

    (1/K) Σ_{t=1..K} (1/m) Σ_i log( (f_i(x_t) + ε f_i(x_0)) / ((1 + ε) f_i(x_0)) )

the mean over the segment's steps and the objectives of the log of each objective's progress
relative to its start. Summing over the unroll rewards fast progress, not only the end point
(Andrychowicz et al. 2016). The log makes every objective scale-free (a problem or objective
whose losses are 100× larger weighs the same) and, summed over objectives, it is the log of the
product of the relative progresses: a trajectory that trades one objective away for another
pays for it, so the learned optimizer is not pulled towards one objective (ε = 0.01 keeps an
objective that reaches 0 from dominating). It uses no preference α, as MGDA uses none.

**Gradients**: first-order, as in Andrychowicz et al.: the network's inputs (the gradients)
are treated as constants (no second derivatives through ∇f), while the iterates ``x_t`` and the
recurrent state keep the graph within a segment; after each segment the meta-loss is
back-propagated, the network takes one Adam step, and x and the state are detached (truncated
BPTT). Adam with a cosine decay of its step size over ``iterations``. Trajectories that diverge (non-finite values) are dropped.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from align.mograd.learned.network import ML2ONet, network_inputs
from lab.meta_training.problems import FAMILIES, Problem, sample_problem


@dataclass
class MetaConfig:
    """The meta-training settings (the fields of ``recipes/ml2o_meta.yaml``'s ``meta:``)."""

    seed: int = 0
    specific_hidden: int = 8
    shared_hidden: int = 16
    tie_specific: bool = True
    #: Meta-updates (one per truncation segment); training also stops after ``max_minutes``.
    iterations: int = 400
    max_minutes: float = 10.0
    #: Steps of one trajectory, and of one truncated segment (one meta-update).
    unroll: int = 40
    truncation: int = 10
    lr: float = 3e-3
    clip: float = 1.0
    epsilon: float = 0.01
    #: Problem family → sampling weight.
    families: dict[str, float] = field(
        default_factory=lambda: {
            "synthetic": 1.0,
            "quadratic": 1.0,
            "multitask": 1.0,
            "tiny_lm": 0.5,
        }
    )
    #: Validation problems per family (the same for the untrained and the trained network).
    validation_per_family: int = 2
    log_every: int = 20

    def __post_init__(self) -> None:
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown problem families {sorted(unknown)}; available: {FAMILIES}")
        if self.unroll < 1 or self.truncation < 1 or self.unroll % self.truncation:
            raise ValueError(
                "unroll and truncation must be >= 1 with unroll a multiple of truncation"
            )


def progress(values: Tensor, start: Tensor, epsilon: float) -> Tensor:
    """``mean_i log((f_i + ε f_i0) / ((1 + ε) f_i0))``: 0 at the start, < 0 when better."""
    start = start.clamp_min(1e-12)
    return torch.log((values.clamp_min(0) + epsilon * start) / ((1 + epsilon) * start)).mean()


def jacobian_at(values: Tensor, x: Tensor) -> Tensor:
    """``(m, dim)`` per-objective gradients at x, detached (no graph of the gradients kept)."""
    rows = [
        torch.autograd.grad(values[i], x, retain_graph=True, allow_unused=True)[0]
        for i in range(values.numel())
    ]
    return torch.stack([torch.zeros_like(x) if g is None else g for g in rows]).detach()


def learned_step(
    net: ML2ONet, jacobian: Tensor, state: Tensor | None
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The network's direction ``d = s · out`` (differentiable in the network's weights), its
    new state and the inputs it read."""
    inputs = network_inputs(jacobian)
    out, state = net.step(inputs["u"], inputs["mgda"], inputs["mean"], state)
    return inputs["scale"] * out, state, inputs


@dataclass
class Learner:
    """What meta-training needs of a learned method: its network, one step (differentiable in
    the network's weights) from the Jacobian, the losses and the recurrent state to the
    direction and the new state, a fresh state per problem, and a line for the log."""

    net: torch.nn.Module
    step: Callable[[Tensor, Tensor, Any], tuple[Tensor, Any]]
    fresh_state: Callable[[Problem], Any]
    describe: Callable[[], str]


def run_segment(
    learner: Learner,
    problem: Problem,
    x: Tensor,
    state: Any,
    steps: int,
    start: Tensor,
    generator: torch.Generator,
    epsilon: float,
) -> tuple[Tensor, Tensor, Any]:
    """``steps`` learned steps from x; returns (segment meta-loss, last x, last state)."""
    x = x.detach().requires_grad_(True)
    total = x.new_zeros(())
    for t in range(steps):
        values = problem.losses(x, generator)
        if t > 0:
            total = total + progress(values, start, epsilon)
        direction, state = learner.step(jacobian_at(values, x), values, state)
        x = problem.project(x - problem.lr * direction)
    total = total + progress(problem.losses(x, generator), start, epsilon)
    return total / steps, x, state


@torch.no_grad()
def full_losses(problem: Problem, x: Tensor) -> Tensor:
    return problem.losses(x, full=True).detach()


def validate(
    learner: Learner, problems: list[Problem], unroll: int, epsilon: float, seed: int
) -> dict[str, float]:
    """Mean final ``progress`` (full-data objectives after ``unroll`` learned steps) per
    problem family name prefix; lower is better."""
    scores: dict[str, list[float]] = defaultdict(list)
    for k, problem in enumerate(problems):
        generator = torch.Generator().manual_seed(seed + k)
        x = problem.initial(generator)
        start, state = full_losses(problem, x), learner.fresh_state(problem)
        for _ in range(unroll):
            xg = x.detach().requires_grad_(True)
            values = problem.losses(xg, generator)
            jacobian = jacobian_at(values, xg)
            with torch.no_grad():
                direction, state = learner.step(jacobian, values, state)
                x = problem.project(x - problem.lr * direction)
        final = float(progress(full_losses(problem, x), start, epsilon))
        scores[problem.name.split("(")[0]].append(final if math.isfinite(final) else 10.0)
    return {name: float(np.mean(v)) for name, v in scores.items()}


def meta_train(
    config: MetaConfig, log: Callable[[str], None] = print
) -> tuple[ML2ONet, dict[str, object]]:
    """Train an :class:`ML2ONet`; returns it and a summary (settings, wall time, validation of
    the untrained network — exactly MGDA — and of the trained one)."""
    torch.manual_seed(config.seed)
    net = ML2ONet(
        config.specific_hidden,
        config.shared_hidden,
        tie_specific=config.tie_specific,
        num_objectives=None if config.tie_specific else 2,
    )
    learner = Learner(
        net,
        step=lambda jacobian, losses, state: learned_step(net, jacobian, state)[:2],
        fresh_state=lambda problem: None,
        describe=lambda: f"gains a={net.gains[0].item():.3f} b={net.gains[1].item():.3f}",
    )
    return net, train_network(learner, config, untrained="untrained_mgda", log=log)


def train_network(
    learner: Learner,
    config: MetaConfig,
    *,
    untrained: str,
    log: Callable[[str], None] = print,
) -> dict[str, object]:
    """The meta-training loop of every learned method: sample a problem, unroll the network on
    it in truncated segments, one Adam step on each segment's meta-loss; validate before and
    after (``untrained`` names the first validation in the summary). Returns the summary."""
    net = learner.net
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(config.iterations, 1))
    names = [n for n, w in config.families.items() if w > 0]
    probabilities = np.array([config.families[n] for n in names], dtype=float)
    probabilities /= probabilities.sum()
    validation_rng = np.random.default_rng(config.seed + 10_000)
    validation = [
        sample_problem(name, validation_rng)
        for name in names
        for _ in range(config.validation_per_family)
    ]
    before = validate(learner, validation, config.unroll, config.epsilon, config.seed)
    log(f"validation before ({untrained.replace('_', ' = ')}): {before}")

    began = time.perf_counter()
    iteration, trajectories, dropped = 0, 0, 0
    recent: dict[str, list[float]] = defaultdict(list)
    segments = config.unroll // config.truncation
    while iteration < config.iterations and time.perf_counter() - began < 60 * config.max_minutes:
        family = names[int(rng.choice(len(names), p=probabilities))]
        problem = sample_problem(family, rng)
        x = problem.initial(generator)
        start, state = full_losses(problem, x), learner.fresh_state(problem)
        trajectories += 1
        for _ in range(segments):
            loss, x, state = run_segment(
                learner, problem, x, state, config.truncation, start, generator, config.epsilon
            )
            if not torch.isfinite(loss) or not torch.isfinite(x).all():
                dropped += 1
                break
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), config.clip)
            optimizer.step()
            schedule.step()
            x, state = x.detach(), state.detach()
            recent[family].append(loss.item())
            iteration += 1
            if iteration % config.log_every == 0:
                summary = {k: round(float(np.mean(v[-20:])), 3) for k, v in recent.items()}
                log(
                    f"meta-step {iteration}  {time.perf_counter() - began:6.1f}s  "
                    f"{learner.describe()}  segment loss by family {summary}"
                )
            if iteration >= config.iterations:
                break
    seconds = time.perf_counter() - began
    after = validate(learner, validation, config.unroll, config.epsilon, config.seed)
    log(f"validation after: {after}  ({seconds:.0f}s, {iteration} meta-steps)")
    return {
        "config": asdict(config),
        "meta_steps": iteration,
        "trajectories": trajectories,
        "dropped_trajectories": dropped,
        "wall_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        f"validation_{untrained}": before,
        "validation_trained": after,
    }
