"""Meta-training of the Gram-L2O network, the same way ML2O is meta-trained.

The problems (:func:`~.problems.sample_problem`), the meta-loss (:func:`~.meta.progress`, the
mean log relative progress over a segment's steps and the objectives), first-order gradients
(the per-objective gradients are constants), truncated BPTT (one Adam step of the network per
segment, x and the history detached after it) and the cosine schedule are ML2O's
(:mod:`~.meta`); only the learned step differs: the network maps the Gram matrix, the losses
and its history to simplex weights w and the step is ``x ← Π(x − η wᵀJ)``. Meta-training runs
the network unguarded (as ML2O is meta-trained without GML2O's guard).

    python -m align.mograd.learned.meta_train recipes/gram_l2o_meta.yaml
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from align.mograd.learned.gram_l2o import GramL2ONet
from align.mograd.learned.meta import MetaConfig, full_losses, jacobian_at, progress
from align.mograd.learned.problems import Problem, sample_problem


@dataclass
class GramMetaConfig(MetaConfig):
    """:class:`~.meta.MetaConfig` (its ML2O-only fields are ignored) plus the network's size."""

    hidden: int = 16
    gate_init: float = -3.0


def gram_step(
    net: GramL2ONet, jacobian: Tensor, losses: Tensor, history: Tensor
) -> tuple[Tensor, Tensor]:
    """The learned direction ``wᵀJ`` (differentiable in the network) and the new history."""
    gram = (jacobian.double() @ jacobian.double().T).detach()
    weights, history, _ = net.step(gram, losses.detach(), history)
    return weights.to(jacobian.dtype) @ jacobian, history


def run_segment(
    net: GramL2ONet,
    problem: Problem,
    x: Tensor,
    history: Tensor,
    steps: int,
    start: Tensor,
    generator: torch.Generator,
    epsilon: float,
) -> tuple[Tensor, Tensor, Tensor]:
    x = x.detach().requires_grad_(True)
    total = x.new_zeros(())
    for t in range(steps):
        values = problem.losses(x, generator)
        if t > 0:
            total = total + progress(values, start, epsilon)
        direction, history = gram_step(net, jacobian_at(values, x), values, history)
        x = problem.project(x - problem.lr * direction)
    total = total + progress(problem.losses(x, generator), start, epsilon)
    return total / steps, x, history


def validate(
    net: GramL2ONet, problems: list[Problem], unroll: int, epsilon: float, seed: int
) -> dict[str, float]:
    """Mean final ``progress`` per problem family (lower is better), as ML2O's validation."""
    scores: dict[str, list[float]] = defaultdict(list)
    for k, problem in enumerate(problems):
        generator = torch.Generator().manual_seed(seed + k)
        x = problem.initial(generator)
        start = full_losses(problem, x)
        history = net.fresh_history(problem.num_objectives)
        for _ in range(unroll):
            xg = x.detach().requires_grad_(True)
            values = problem.losses(xg, generator)
            jacobian = jacobian_at(values, xg)
            with torch.no_grad():
                direction, history = gram_step(net, jacobian, values, history)
                x = problem.project(x - problem.lr * direction)
        final = float(progress(full_losses(problem, x), start, epsilon))
        scores[problem.name.split("(")[0]].append(final if math.isfinite(final) else 10.0)
    return {name: float(np.mean(v)) for name, v in scores.items()}


def meta_train_gram(
    config: GramMetaConfig, log: Callable[[str], None] = print
) -> tuple[GramL2ONet, dict[str, object]]:
    """Train a :class:`GramL2ONet`; returns it and a summary (settings, wall time, validation
    of the untrained and of the trained network)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    net = GramL2ONet(config.hidden, config.gate_init)
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
    before = validate(net, validation, config.unroll, config.epsilon, config.seed)
    log(f"validation before (untrained): {before}")
    began = time.perf_counter()
    iteration, trajectories, dropped = 0, 0, 0
    recent: dict[str, list[float]] = defaultdict(list)
    segments = config.unroll // config.truncation
    while iteration < config.iterations and time.perf_counter() - began < 60 * config.max_minutes:
        family = names[int(rng.choice(len(names), p=probabilities))]
        problem = sample_problem(family, rng)
        x = problem.initial(generator)
        start = full_losses(problem, x)
        history = net.fresh_history(problem.num_objectives)
        trajectories += 1
        for _ in range(segments):
            loss, x, history = run_segment(
                net, problem, x, history, config.truncation, start, generator, config.epsilon
            )
            if not torch.isfinite(loss) or not torch.isfinite(x).all():
                dropped += 1
                break
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), config.clip)
            optimizer.step()
            schedule.step()
            x, history = x.detach(), history.detach()
            recent[family].append(loss.item())
            iteration += 1
            if iteration % config.log_every == 0:
                summary = {k: round(float(np.mean(v[-20:])), 3) for k, v in recent.items()}
                gate = torch.sigmoid(net.gate.bias).item()
                log(
                    f"meta-step {iteration}  {time.perf_counter() - began:6.1f}s  "
                    f"gate(bias)={gate:.3f}  segment loss by family {summary}"
                )
            if iteration >= config.iterations:
                break
    seconds = time.perf_counter() - began
    after = validate(net, validation, config.unroll, config.epsilon, config.seed)
    log(f"validation after: {after}  ({seconds:.0f}s, {iteration} meta-steps)")
    summary = {
        "config": asdict(config),
        "meta_steps": iteration,
        "trajectories": trajectories,
        "dropped_trajectories": dropped,
        "wall_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "validation_untrained": before,
        "validation_trained": after,
    }
    return net, summary
