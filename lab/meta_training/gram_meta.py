"""Meta-training of the Gram-L2O network, the same way ML2O is meta-trained.

The problems (:func:`~.problems.sample_problem`), the meta-loss (:func:`~.meta.progress`, the
mean log relative progress over a segment's steps and the objectives), first-order gradients
(the per-objective gradients are constants), truncated BPTT (one Adam step of the network per
segment, x and the history detached after it) and the cosine schedule are ML2O's
(:mod:`~.meta`); only the learned step differs: the network maps the Gram matrix, the losses
and its history to simplex weights w and the step is ``x ← Π(x − η wᵀJ)``. Meta-training runs
the network unguarded (as ML2O is meta-trained without GML2O's guard).

    python -m lab.meta_training recipes/gram_l2o_meta.yaml
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from align.mograd.learned.gram_l2o import GramL2ONet
from lab.meta_training.meta import (
    Learner,
    MetaConfig,
    train_network,
)


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


def meta_train_gram(
    config: GramMetaConfig, log: Callable[[str], None] = print
) -> tuple[GramL2ONet, dict[str, object]]:
    """Train a :class:`GramL2ONet`; returns it and a summary (settings, wall time, validation
    of the untrained and of the trained network)."""
    torch.manual_seed(config.seed)
    net = GramL2ONet(config.hidden, config.gate_init)
    learner = Learner(
        net,
        step=lambda jacobian, losses, history: gram_step(net, jacobian, losses, history),
        fresh_state=lambda problem: net.fresh_history(problem.num_objectives),
        describe=lambda: f"gate(bias)={torch.sigmoid(net.gate.bias).item():.3f}",
    )
    return net, train_network(learner, config, untrained="untrained", log=log)
