"""Run any registered multi-gradient method on a differentiable problem ``x -> f(x)``.

Two ways to approximate a Pareto front:

* :func:`solve_finite_set` — K independent solutions, one per preference α_k, each moved by
  projected gradient descent (a plain step, or Adam, then a clamp into the box). Loss-level methods backward
  their scalar; gradient-level methods get each solution's Jacobian ``J_k = ∂f/∂x`` (m × n), and
  the update is their direction ``w_kᵀ J_k``. Preference-based methods receive α_k; the others
  ignore it, so their K solutions differ only by their K random starting points.
* :func:`pareto_set_learning` — one α-conditioned network ``α -> x`` (Navon et al., ICLR 2021;
  Lin et al., NeurIPS 2022), trained on α ~ Dirichlet and read out on a grid of α; by default
  with the smooth Tchebycheff paper's protocol (:data:`PSL_PROTOCOL`).

Every method is handed α; whether it uses it is probed (:func:`responds_to_preference`), as
linear scalarization takes α optionally. Both solvers are seeded and deterministic on CPU, in
float64. The problem is any callable mapping a
batch ``x (K, n)`` row by row to ``f (K, m)`` (wrap an unbatched function with
``torch.vmap``), with box bounds (``problem.bounds`` for the built-in problems).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from align.metrics import hypervolume
from align.mograd.base import GradientAggregator, LossAggregator, UpdateAggregator
from align.mograd.registry import aggregator_class, canonical_aggregators
from align.preference import sample_preferences, simplex_grid, validate_weights

Objective = Callable[[Tensor], Tensor]
Method = LossAggregator | GradientAggregator


@dataclass
class SolveResult:
    """What a solver found: row k of ``objectives`` is f at ``solutions[k]``, obtained with
    ``preferences[k]`` (which the method ignored unless ``preference_based``)."""

    method: str
    solutions: Tensor
    objectives: np.ndarray
    preferences: Tensor
    preference_based: bool
    seconds: float


def make_method(name: str, num_objectives: int, seed: int = 0, **options: Any) -> Method:
    """``get_aggregator(name, **options)``, also passing ``num_objectives`` and ``seed`` to the
    methods whose constructor takes them (uncertainty weighting needs m up front; random
    weighting draws from its seed)."""
    cls = aggregator_class(name)
    accepted = inspect.signature(cls).parameters
    extra = {"num_objectives": num_objectives, "seed": seed}
    for option, value in extra.items():
        if option in accepted and option not in options:
            options[option] = value
    try:
        return cls(**options)
    except TypeError as error:
        raise ValueError(f"bad options for {name!r}: {error}") from error


def responds_to_preference(name: str, num_objectives: int, **options: Any) -> bool:
    """Whether the method's output depends on α: ``uses_preference`` methods do, and so do
    methods that take α optionally (linear scalarization); the rest ignore it.

    Probed on fresh instances (so stateful methods are untouched) with two different α on the
    same losses / Gram matrix.
    """
    m = num_objectives
    first = make_method(name, m, **options)
    if first.uses_preference:
        return True
    if m < 2:
        return False
    tilted = torch.full((m,), 0.3 / (m - 1), dtype=torch.float64)
    tilted[0] = 0.7
    alphas = (tilted, tilted.roll(1))
    losses = torch.linspace(1.0, 2.0, m, dtype=torch.float64)
    jacobian = (
        torch.eye(m, m + 1, dtype=torch.float64)
        + 0.1 * torch.arange(m * (m + 1)).reshape(m, m + 1).to(torch.float64).sin()
    )
    outputs = []
    for alpha, method in zip(alphas, (first, make_method(name, m, **options))):
        if isinstance(method, GradientAggregator):
            out = method.weights(jacobian @ jacobian.T, losses=losses, preference=alpha)
        elif isinstance(method, UpdateAggregator):
            out = method(jacobian, losses=losses, preference=alpha)
        else:
            out = method(losses, alpha)
        outputs.append(out.detach().to(torch.float64))
    return not torch.allclose(outputs[0], outputs[1])


def method_names() -> list[str]:
    """Every registered method once, by its canonical name (aliases dropped), sorted."""
    return canonical_aggregators()


def hypervolume_gap(problem: Any, points: Any) -> float:
    """``HV(true front) − HV(points)`` with the problem's reference point (minimisation)."""
    found = hypervolume(points, problem.reference_point, maximize=False)
    return float(problem.true_hypervolume - found)


def _bounds(problem: Any, bounds: tuple[Any, Any] | None) -> tuple[Tensor, Tensor]:
    if bounds is None:
        bounds = getattr(problem, "bounds", None)
        if bounds is None:
            raise ValueError("pass bounds=(lower, upper): the problem has no .bounds")
    lower, upper = (torch.as_tensor(b, dtype=torch.float64).reshape(-1) for b in bounds)
    if lower.shape != upper.shape or lower.numel() == 0 or not (upper > lower).all():
        raise ValueError(
            f"bounds must be two vectors of the same length with lower < upper, got "
            f"{lower.tolist()} and {upper.tolist()}"
        )
    return lower, upper


def _evaluate(problem: Objective, x: Tensor) -> Tensor:
    values = problem(x)
    if not isinstance(values, Tensor) or values.ndim != 2 or values.shape[0] != x.shape[0]:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(
            f"the problem must map x of shape (K, n) to f of shape (K, m), got {shape} for "
            f"{tuple(x.shape)}; wrap an unbatched function with torch.vmap"
        )
    return values


def _jacobians(values: Tensor, x: Tensor) -> Tensor:
    """``(K, m, n)``: row k is ∂f(x_k)/∂x_k (rows of the problem are independent, so the
    gradient of each objective summed over rows separates them)."""
    rows = [
        torch.autograd.grad(values[:, i].sum(), x, retain_graph=True)[0]
        for i in range(values.shape[1])
    ]
    return torch.stack(rows, dim=1)


def _check_preferences(preferences: Any, m: int) -> Tensor:
    alphas = torch.as_tensor(preferences, dtype=torch.float64)
    if alphas.ndim != 2 or alphas.shape[1] != m or alphas.shape[0] == 0:
        raise ValueError(
            f"preferences must be a (K, {m}) array, one α per solution, got shape "
            f"{tuple(alphas.shape)}"
        )
    validate_weights(alphas.numpy(), tuple(f"f{i + 1}" for i in range(m)))
    return alphas


def _method_parameters(methods: Sequence[Method]) -> list[nn.Parameter]:
    # Uncertainty weighting learns its log-variances with the solution.
    return [p for method in methods for p in method.parameters() if p.requires_grad]


def _optimizer(name: str, parameters: list[Tensor], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def solve_finite_set(
    problem: Objective,
    method: str,
    preferences: Any,
    *,
    bounds: tuple[Any, Any] | None = None,
    steps: int = 300,
    lr: float = 0.1,
    seed: int = 0,
    optimizer: str = "sgd",
    method_options: dict[str, Any] | None = None,
) -> SolveResult:
    """K solutions, one per row of ``preferences`` (K, m), by projected gradient descent.

    ``optimizer`` is ``"sgd"`` (plain steps ``x ← clamp(x − lr·d)``, the default) or
    ``"adam"``; the defaults are those of ``evaluation/mograd_synthetic.py``.

    Solution k starts at a uniform random point of the box (the starts depend only on
    ``seed``, so every method starts from the same K points) and has its own instance of the
    method, built with ``seed + k``. Loss-level methods see ``observe`` with the losses after
    each step.
    """
    lower, upper = _bounds(problem, bounds)
    generator = torch.Generator().manual_seed(seed)
    start = lower + (upper - lower) * torch.rand(
        (torch.as_tensor(preferences).shape[0], lower.numel()),
        generator=generator,
        dtype=torch.float64,
    )
    x = start.clone().requires_grad_(True)
    m = _evaluate(problem, start).shape[1]
    alphas = _check_preferences(preferences, m)
    methods = [make_method(method, m, seed + k, **(method_options or {})) for k in range(len(x))]
    # Update-level methods (ML2O, GML2O) map the Jacobian to the direction themselves.
    update_level = isinstance(methods[0], UpdateAggregator)
    gradient_level = update_level or isinstance(methods[0], GradientAggregator)
    preference_based = responds_to_preference(method, m, **(method_options or {}))
    optimizer = _optimizer(optimizer, [x, *_method_parameters(methods)], lr)

    began = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        values = _evaluate(problem, x)
        if gradient_level:
            jacobians = _jacobians(values, x)
            directions = []
            for k, aggregator in enumerate(methods):
                if update_level:
                    directions.append(
                        aggregator(jacobians[k], losses=values[k].detach()).to(jacobians)
                    )
                    continue
                weights = aggregator.weights(
                    jacobians[k] @ jacobians[k].T,
                    losses=values[k].detach(),
                    preference=alphas[k],
                )
                directions.append(weights.to(jacobians) @ jacobians[k])
            x.grad = torch.stack(directions)
        else:
            total = sum(aggregator(values[k], alphas[k]) for k, aggregator in enumerate(methods))
            total.backward()
        optimizer.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, upper), lower))
            if not gradient_level:
                after = _evaluate(problem, x)
                for k, aggregator in enumerate(methods):
                    aggregator.observe(after[k])
    seconds = time.perf_counter() - began
    with torch.no_grad():
        final = _evaluate(problem, x).numpy()
    return SolveResult(methods[0].name, x.detach(), final, alphas, preference_based, seconds)


#: The Pareto-set-learning protocol of Lin et al., "Smooth Tchebycheff Scalarization for
#: Multi-Objective Optimization" (ICML 2024), as in its code (github.com/Xi-L/STCH,
#: ``STCH_PSL/model.py`` and ``STCH_PSL/run_stch_psl.py``): an MLP m → 512 → 512 → n with ReLU
#: and a sigmoid output, 2,000 Adam steps at lr 1e-3, 10 preferences α ~ Dirichlet(1) per step.
#: :func:`pareto_set_learning`'s defaults.
PSL_PROTOCOL: dict[str, Any] = {
    "hidden": 512,
    "steps": 2000,
    "lr": 1e-3,
    "batch_size": 10,
    "concentration": 1.0,
}


class ParetoSetModel(nn.Module):
    """``α -> x``: an MLP ``m → hidden → hidden → n`` (ReLU) whose sigmoid output is mapped
    into the box (so x is always feasible, no projection needed); ``hidden`` 512 as in the
    smooth Tchebycheff paper's code (:data:`PSL_PROTOCOL`)."""

    def __init__(
        self, lower: Tensor, upper: Tensor, m: int, hidden: int = PSL_PROTOCOL["hidden"]
    ) -> None:
        super().__init__()
        self.register_buffer("lower", lower)
        self.register_buffer("upper", upper)
        self.net = nn.Sequential(
            nn.Linear(m, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, lower.numel()),
        ).double()

    def forward(self, preferences: Tensor) -> Tensor:
        return self.lower + (self.upper - self.lower) * torch.sigmoid(self.net(preferences))


def evaluation_grid(m: int) -> Tensor:
    """The α grid Pareto set learning is read out on: 100 points for m = 2, 1035 for m = 3
    (as in the smooth Tchebycheff paper), a 10-division simplex grid beyond."""
    return simplex_grid(m, {2: 99, 3: 44}.get(m, 10))


def pareto_set_learning(
    problem: Objective,
    method: str,
    *,
    bounds: tuple[Any, Any] | None = None,
    steps: int = PSL_PROTOCOL["steps"],
    lr: float = PSL_PROTOCOL["lr"],
    batch_size: int = PSL_PROTOCOL["batch_size"],
    hidden: int = PSL_PROTOCOL["hidden"],
    concentration: float = PSL_PROTOCOL["concentration"],
    seed: int = 0,
    eval_preferences: Any = None,
    method_options: dict[str, Any] | None = None,
) -> SolveResult:
    """Train ``α -> x`` on ``batch_size`` α ~ Dirichlet(concentration) per step, with Adam.

    **The defaults are the published protocol** of Lin et al., *Smooth Tchebycheff
    Scalarization for Multi-Objective Optimization* (ICML 2024), as its code runs it
    (github.com/Xi-L/STCH, ``STCH_PSL/model.py``, ``STCH_PSL/run_stch_psl.py``;
    :data:`PSL_PROTOCOL`): a :class:`ParetoSetModel` with two hidden layers of 512 (ReLU,
    sigmoid output, PyTorch's default initialisation), 2,000 Adam steps at lr 1e-3, 10
    preferences α ~ Dirichlet(1) per step, read out on 100 (m = 2) or 1035 (m = 3) α
    (:func:`evaluation_grid`). STCH's own defaults match the paper's (μ = 0.01, ideal point 0).
    Differences from that code: the loss is the batch *mean* (the paper sums; Adam makes the
    two agree up to its ε), the network runs in float64 (the paper's in float32), and the
    objectives are used as the problem returns them (the paper divides each by its problem's
    nadir − ideal range, which is [0, 1] for its synthetic problems). Smaller settings (e.g.
    ``hidden=64, steps=150``) train in a fraction of the time, for tests; before this protocol
    the defaults here were two layers of 64 and 500 steps at lr 5e-3.

    * preference-based loss-level methods: the mean over the batch of ``method(f(x(α_b)), α_b)``;
      each row's losses are then observed (so a running ideal point is the minimum over rows);
    * other loss-level methods: ``method(mean_b f(x(α_b)))`` — they ignore α, so the network
      has no reason to depend on it and the front collapses (the table says so);
    * gradient-level methods: per row, weights ``w_b`` from the Gram of ``∂f/∂x`` at
      ``x(α_b)`` — the method applied in solution space, then chained through the network —
      and the network minimises ``mean_b w_bᵀ f(x(α_b))`` with ``w_b`` held fixed.

    Returns the solutions on ``eval_preferences`` (default :func:`evaluation_grid`).
    """
    lower, upper = _bounds(problem, bounds)
    m = _evaluate(problem, ((lower + upper) / 2)[None]).shape[1]
    aggregator = make_method(method, m, seed, **(method_options or {}))
    gradient_level = isinstance(aggregator, GradientAggregator)
    preference_based = responds_to_preference(method, m, **(method_options or {}))
    with torch.random.fork_rng():  # a seeded network without touching the global RNG
        torch.manual_seed(seed)
        model = ParetoSetModel(lower, upper, m, hidden)
    optimizer = torch.optim.Adam([*model.parameters(), *_method_parameters([aggregator])], lr=lr)
    rng = np.random.default_rng(seed)

    began = time.perf_counter()
    for _ in range(steps):
        alphas = sample_preferences(m, batch_size, concentration, rng)
        optimizer.zero_grad()
        x = model(alphas)
        values = _evaluate(problem, x)
        if gradient_level:
            jacobians = _jacobians(values, x)
            weights = torch.stack(
                [
                    aggregator.weights(
                        jacobians[b] @ jacobians[b].T,
                        losses=values[b].detach(),
                        preference=alphas[b],
                    ).to(values)
                    for b in range(batch_size)
                ]
            )
            loss = (weights.detach() * values).sum(1).mean()
        elif preference_based:
            loss = torch.stack([aggregator(values[b], alphas[b]) for b in range(batch_size)]).mean()
        else:
            loss = aggregator(values.mean(0))
        loss.backward()
        optimizer.step()
        if not gradient_level:
            with torch.no_grad():
                after = _evaluate(problem, model(alphas))
            for row in after if preference_based else after.mean(0, keepdim=True):
                aggregator.observe(row)
    seconds = time.perf_counter() - began

    grid = evaluation_grid(m) if eval_preferences is None else eval_preferences
    grid = _check_preferences(grid, m)
    with torch.no_grad():
        solutions = model(grid)
        final = _evaluate(problem, solutions).numpy()
    return SolveResult(aggregator.name, solutions, final, grid, preference_based, seconds)
