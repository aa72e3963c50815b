"""Meta-training of the Gram-L2O network, the same way ML2O is meta-trained.

The problems (:func:`~.problems.sample_problem`), the meta-loss (:func:`~.meta.progress`, the
mean log relative progress over a segment's steps and the objectives), first-order gradients
(the per-objective gradients are constants), truncated BPTT (one Adam step of the network per
segment, x and the history detached after it) and the cosine schedule are ML2O's
(:mod:`~.meta`); only the learned step differs: the network maps the Gram matrix, the losses
and its history to simplex weights w and the step is ``x ← Π(x − η wᵀJ)``. Meta-training runs
the network unguarded (as ML2O is meta-trained without GML2O's guard).

    python -m align.mograd.learned.training recipes/gram_l2o_meta.yaml
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from align.mograd.learned.gram_l2o import GramL2ONet
from align.mograd.learned.training.meta import (
    MetaConfig,
    full_losses,
    jacobian_at,
    progress,
    train_network,
)
from align.mograd.learned.training.problems import Problem


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
    net = GramL2ONet(config.hidden, config.gate_init)
    return net, train_network(
        net,
        config,
        validate=validate,
        run_segment=run_segment,
        fresh_state=lambda problem: net.fresh_history(problem.num_objectives),
        describe=lambda: f"gate(bias)={torch.sigmoid(net.gate.bias).item():.3f}",
        untrained="untrained",
        log=log,
    )
