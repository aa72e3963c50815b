"""Gram-L2O (align.mograd.learned.gram_l2o): learned simplex weights from the Gram matrix,
guarded like GML2O. Properties in the torchjd style (simplex, permutation equivariance, scale
invariance, the guard's common descent), state round trips, the engine (one process, two
processes under ZeRO-2), the shipped weights and that meta-training learned something."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from align.mograd import available_aggregators, get_aggregator
from align.mograd.engine import MultiObjectiveEngine
from align.mograd.learned.gram_l2o import (
    GramL2O,
    GramL2ONet,
    default_weights_path,
    gram_accepts,
    gram_network_info,
    load_gram_network,
    save_gram_network,
)
from lab.meta_training.gram_meta import GramMetaConfig, meta_train_gram
from lab.meta_training.problems import BoxProblem, Quadratic

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


def jacobian(m: int, p: int = 40, seed: int = 0, spread: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-spread / 2, spread / 2, m)
    shared = torch.randn(p, generator=g)
    return (0.7 * shared + torch.randn(m, p, generator=g)).double() * scales.unsqueeze(1)


def losses_for(m: int, step: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + seed)
    return (torch.rand(m, generator=g) + 0.5).double() * 0.9**step


def mgda_weights(gram: torch.Tensor) -> torch.Tensor:
    return get_aggregator("mgda").weights(gram).double()


def forced_net(gate: float, logits_bias: float = 0.0) -> GramL2ONet:
    """γ = sigmoid(gate) of equal weights (zero head) mixed with MGDA's."""
    net = GramL2ONet()
    with torch.no_grad():
        net.gate.bias.fill_(gate)
        net.head.bias.fill_(logits_bias)
    return net


def trajectory(method: GramL2O, jacobians, losses, permutation=None, scale=1.0):
    out = []
    for j, loss in zip(jacobians, losses):
        if permutation is not None:
            j, loss = j[permutation], loss[permutation]
        out.append(method.weights(scale * (j @ j.T), losses=loss).clone())
    return out


# --- registry, simplex ---------------------------------------------------------------------


def test_registered_as_a_gradient_level_method():
    kinds = available_aggregators()
    assert kinds["gram_l2o"] == "gradient"
    method = get_aggregator("gram_l2o", margin=0.25)
    assert isinstance(method, GramL2O) and method.margin == 0.25
    with pytest.raises(ValueError, match="margin must be > 0"):
        get_aggregator("gram_l2o", margin=0)
    with pytest.raises(ValueError, match="bad options"):
        get_aggregator("gram_l2o", no_such_option=1)


@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("guard", [True, False])
def test_weights_are_on_the_simplex(m, guard):
    for source in ("default", None):
        method = GramL2O(source, guard=guard)
        for step in range(4):
            j = jacobian(m, seed=10 * m + step)
            w = method.weights(j @ j.T, losses=losses_for(m, step))
            assert w.shape == (m,) and torch.isfinite(w).all()
            assert (w >= -1e-12).all() and float(w.sum()) == pytest.approx(1.0, abs=1e-9)
            d = method(j.float(), losses=losses_for(m, step))  # the Jacobian entry point
            assert d.shape == (j.shape[1],)
        assert int(method.steps) == 8 and method.history.shape[0] == m


# --- equivariance and invariance -----------------------------------------------------------


@pytest.mark.parametrize("m", [2, 3, 4])
def test_permuting_the_objectives_permutes_the_weights(m):
    jacobians = [jacobian(m, seed=s) for s in range(5)]
    losses = [losses_for(m, s) for s in range(5)]
    permutation = torch.randperm(m, generator=torch.Generator().manual_seed(m))
    for net in ("default", forced_net(0.0, 0.0)):
        plain = trajectory(GramL2O(net, guard=False), jacobians, losses)
        permuted = trajectory(GramL2O(net, guard=False), jacobians, losses, permutation)
        for a, b in zip(plain, permuted):
            torch.testing.assert_close(b, a[permutation], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("c", [1e-6, 3.0, 1e4])
def test_weights_are_invariant_to_scaling_the_whole_gram(c):
    jacobians = [jacobian(3, seed=s) for s in range(5)]
    losses = [losses_for(3, s) for s in range(5)]
    for guard in (True, False):
        base = trajectory(GramL2O(guard=guard), jacobians, losses)
        scaled = trajectory(GramL2O(guard=guard), jacobians, losses, scale=c)
        for a, b in zip(base, scaled):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)


def test_weights_are_invariant_to_scaling_each_loss():
    jacobians = [jacobian(3, seed=s) for s in range(4)]
    losses = [losses_for(3, s) for s in range(4)]
    scaled = [loss * torch.tensor([1e-3, 1.0, 50.0], dtype=torch.float64) for loss in losses]
    a = trajectory(GramL2O(guard=False), jacobians, losses)
    b = trajectory(GramL2O(guard=False), jacobians, scaled)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-9)


# --- the guard -----------------------------------------------------------------------------


def test_guard_falls_back_to_mgda_on_a_conflicting_learned_step():
    conflict = torch.tensor([[1.0, 0.0], [-2.0, 0.1]], dtype=torch.float64)
    gram = conflict @ conflict.T
    equal = GramL2O(net=forced_net(30.0))  # γ = 1: equal weights, the mean gradient
    w = equal.weights(gram)
    assert equal.last_accepted is False and equal.acceptance_rate == 0.0
    torch.testing.assert_close(w, mgda_weights(gram))
    d = w @ conflict
    assert (conflict @ d >= float(d @ d) * (1 - 1e-9)).all()  # MGDA: a common descent dir.
    assert not gram_accepts(gram, torch.tensor([0.5, 0.5]), mgda_weights(gram), 0.5, 10.0)
    # The unguarded method returns the equal weights.
    torch.testing.assert_close(
        GramL2O(net=forced_net(30.0), guard=False).weights(gram),
        torch.tensor([0.5, 0.5], dtype=torch.float64),
    )
    # Aligned gradients: equal weights are a common descent direction, and are taken.
    aligned = torch.tensor([[1.0, 0.2], [0.8, -0.1]], dtype=torch.float64)
    ok = GramL2O(net=forced_net(30.0))
    torch.testing.assert_close(
        ok.weights(aligned @ aligned.T), torch.tensor([0.5, 0.5], dtype=torch.float64)
    )
    assert ok.last_accepted is True and ok.acceptance_rate == 1.0


def test_every_returned_direction_passes_gml2o_test():
    for seed in range(30):
        m = 2 + seed % 4
        method = GramL2O()
        for step in range(4):
            j = jacobian(m, seed=seed * 10 + step, spread=4.0 * (seed % 2))
            w = method.weights(j @ j.T, losses=losses_for(m, step, seed))
            d, star = w @ j, mgda_weights(j @ j.T) @ j
            floor = 0.5 * float(star @ star)
            assert (j @ d >= floor * (1 - 1e-9) - 1e-15).all()
            assert float(d.norm()) <= 10 * float(star.norm()) * (1 + 1e-9)
        assert method.acceptance_rate is not None


def test_guarded_steps_drive_pareto_stationarity_to_zero_on_a_quadratic():
    problem = Quadratic(30, 3, seed=0)
    x = problem.initial(torch.Generator().manual_seed(0))
    method = GramL2O()
    norms = []
    for _ in range(150):
        xg = x.clone().requires_grad_(True)
        values = problem.losses(xg, full=True)
        j = torch.stack([torch.autograd.grad(v, xg, retain_graph=True)[0] for v in values])
        gram = (j @ j.T).double()
        norms.append(float((mgda_weights(gram).float() @ j).norm()))
        x = x - problem.lr * (method.weights(gram, losses=values.detach()).float() @ j)
    assert norms[-1] < 0.05 * norms[0]


# --- state ---------------------------------------------------------------------------------


def test_state_dict_round_trip_reproduces_the_next_weights():
    jacobians = [jacobian(3, seed=s) for s in range(6)]
    losses = [losses_for(3, s) for s in range(6)]
    original = GramL2O()
    trajectory(original, jacobians[:3], losses[:3])
    restored = GramL2O()
    restored.load_state_dict({k: v.clone() for k, v in original.state_dict().items()})
    assert int(restored.steps) == 3 and restored.acceptance_rate == original.acceptance_rate
    for j, loss in zip(jacobians[3:], losses[3:]):
        a = original.weights(j @ j.T, losses=loss)
        b = restored.weights(j @ j.T, losses=loss)
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    # The history matters: a fresh instance gives other weights.
    fresh = GramL2O(guard=False)
    carried = GramL2O(guard=False)
    trajectory(carried, jacobians[:3], losses[:3])
    j = jacobians[3]
    assert not torch.allclose(
        fresh.weights(j @ j.T, losses=losses[3]), carried.weights(j @ j.T, losses=losses[3])
    )


def test_another_number_of_objectives_starts_a_fresh_history():
    method = GramL2O()
    j = jacobian(2)
    method.weights(j @ j.T)
    with pytest.warns(UserWarning, match="fresh history"):
        j = jacobian(3)
        method.weights(j @ j.T)
    assert method.history.shape[0] == 3


# --- the engine ----------------------------------------------------------------------------


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))

    def forward(self, x):
        z = self.trunk(x)
        return torch.cat([h(z) for h in self.heads], dim=1), z


def test_engine_injects_w_transpose_j_and_checkpoints_the_history():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
    model = TwoHeads()
    params = list(model.parameters())
    engine = MultiObjectiveEngine("gram_l2o", params)
    reference = GramL2O()
    optimizer = torch.optim.SGD(params, lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        out, _ = model(x)
        losses = ((out - y) ** 2).mean(0)
        rows = [
            torch.autograd.grad(v, params, retain_graph=True, allow_unused=True) for v in losses
        ]
        j = torch.stack(
            [
                torch.cat(
                    [
                        (torch.zeros_like(p) if r is None else r).reshape(-1)
                        for r, p in zip(row, params)
                    ]
                )
                for row in rows
            ]
        )
        w = reference.weights((j @ j.T).double(), losses=losses.detach().float())
        engine(losses).backward()
        got = torch.cat([p.grad.reshape(-1) for p in params])
        torch.testing.assert_close(got, w.float() @ j, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(engine.last_weights, w)
        optimizer.step()
    resumed = MultiObjectiveEngine("gram_l2o", params)
    resumed.load_state_dict(engine.state_dict())
    torch.testing.assert_close(resumed.aggregator.history, engine.aggregator.history)
    # Feature-level works too (the Gram of the gradients w.r.t. the shared features).
    feature = MultiObjectiveEngine("gram_l2o", params, feature_level=True)
    out, z = model(x)
    feature(((out - y) ** 2).mean(0), features=z).backward()
    assert feature.last_weights is not None and feature.last_weights.shape == (3,)


# --- weights and meta-training -------------------------------------------------------------


def test_shipped_weights_load_and_carry_their_summary():
    path = default_weights_path()
    assert path.is_file() and path.stat().st_size < 64_000
    net = load_gram_network("default")
    assert not torch.allclose(net.head.weight, GramL2ONet(**net.config()).head.weight)
    info = gram_network_info()
    assert info["meta_steps"] > 0
    assert set(info["validation_trained"]) == set(info["validation_untrained"])


def test_meta_training_runs_and_round_trips_through_a_file(tmp_path):
    config = GramMetaConfig(
        iterations=4,
        unroll=4,
        truncation=2,
        families={"quadratic": 1.0, "synthetic": 1.0},
        validation_per_family=1,
        log_every=2,
    )
    lines = []
    net, summary = meta_train_gram(config, log=lines.append)
    assert summary["meta_steps"] == 4 and any("meta-step" in line for line in lines)
    assert not torch.equal(net.gate.bias.detach(), torch.tensor([-3.0]))  # it moved
    path = save_gram_network(net, tmp_path / "w.safetensors", note="test")
    again = load_gram_network(path)
    for a, b in zip(net.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a.float(), b)
    assert gram_network_info(path)["note"] == "test"


def _final_progress(problem, method, steps: int, starts: int = 3) -> float:
    """Mean over starts of the mean log relative progress of the objectives after ``steps``
    full-gradient steps (lower is better)."""
    scores = []
    for k in range(starts):
        x = problem.initial(torch.Generator().manual_seed(50 + k))
        if hasattr(method, "reset"):
            method.reset()
        with torch.no_grad():
            start = problem.losses(x, full=True)
        for _ in range(steps):
            xg = x.clone().requires_grad_(True)
            values = problem.losses(xg, full=True)
            j = torch.stack([torch.autograd.grad(v, xg, retain_graph=True)[0] for v in values])
            w = method.weights((j @ j.T).double(), losses=values.detach())
            with torch.no_grad():
                x = problem.project(x - problem.lr * (w.float() @ j))
        with torch.no_grad():
            final = problem.losses(x, full=True)
        scores.append(float(torch.log((final + 0.01 * start) / (1.01 * start)).mean()))
    return sum(scores) / len(scores)


def test_meta_trained_weights_do_at_least_as_well_as_mgda_on_a_held_out_problem():
    """ZDT2 (n = 20) was never in meta-training (ZDT1 and VLMOP2 were); MGDA's min-norm step
    shrinks there as the objectives conflict. The guarded, meta-trained method does at least as
    well as MGDA and as the untrained network."""
    problem = BoxProblem("zdt2", num_variables=20, lr=0.05)
    trained = _final_progress(problem, GramL2O(), 40)
    untrained = _final_progress(problem, GramL2O(None), 40)
    mgda = _final_progress(problem, get_aggregator("mgda"), 40)
    assert trained <= mgda + 1e-6
    assert trained <= untrained + 1e-6


# --- two processes -------------------------------------------------------------------------


def _engine_tests():
    spec = importlib.util.spec_from_file_location(
        "test_mograd_engine", REPO / "tests" / "test_mograd_engine.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_same_weights_and_state(results: dict, method: str, step) -> None:
    reference_weights, reference_states = [], []
    step.run(None, method, 2, weights=reference_weights, states=reference_states)
    ranks_weights, ranks_states = results[f"weights/{method}"], results[f"states/{method}"]
    assert len(ranks_weights) == 2 and len(ranks_weights[0]) == step.STEPS
    for on_0, on_1, expected in zip(*ranks_weights, reference_weights):
        assert torch.equal(on_0, on_1)  # every rank computes the same weights
        torch.testing.assert_close(on_0, expected, rtol=1e-5, atol=1e-7)
    for on_0, on_1, expected in zip(*ranks_states, reference_states):
        for key in ("history", "steps", "accepted", "decisions"):
            assert torch.equal(on_0[key], on_1[key]), key
            torch.testing.assert_close(on_0[key], expected[key], rtol=1e-5, atol=1e-6)
    assert int(reference_states[-1]["decisions"]) == step.STEPS


@pytest.mark.multiprocess
def test_zero2_two_processes_give_the_same_update_and_state_as_one_process(tmp_path):
    engine_tests = _engine_tests()
    results = engine_tests._launch(tmp_path, "zero2", "--methods", "gram_l2o")
    engine_tests._assert_matches_one_process(results, ["gram_l2o"])
    _assert_same_weights_and_state(results, "gram_l2o", engine_tests._step_module())


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_ddp_and_zero3_two_processes_match_one_process(tmp_path, backend):
    engine_tests = _engine_tests()
    results = engine_tests._launch(tmp_path, backend, "--methods", "gram_l2o")
    engine_tests._assert_matches_one_process(results, ["gram_l2o"])
    _assert_same_weights_and_state(results, "gram_l2o", engine_tests._step_module())
