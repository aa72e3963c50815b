"""Synthetic problems (checked against pymoo), the finite-set and Pareto-set-learning solvers,
and the hypervolume-gap evaluation script."""

import importlib.util
import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from align.metrics import hypervolume, pareto_mask
from align.mograd import available_aggregators
from align.preference import simplex_grid
from lab.synthetic import (
    PROBLEMS,
    PSL_PROTOCOL,
    ParetoSetModel,
    get_problem,
    hypervolume_gap,
    make_method,
    method_names,
    pareto_set_learning,
    solve_finite_set,
    solvers,
)
from lab.synthetic.solvers import responds_to_preference

pymoo_problems = pytest.importorskip("pymoo.problems")

SCRIPT = Path(__file__).resolve().parents[1] / "evaluation" / "mograd_synthetic.py"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("mograd_synthetic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pymoo_problem(problem):
    options = {"n_var": problem.num_variables}
    if problem.name == "dtlz2":
        options["n_obj"] = problem.num_objectives
    return pymoo_problems.get_problem(problem.name, **options)


# --- problems ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["zdt1", "zdt2", "dtlz2"])
def test_objectives_match_pymoo(name):
    problem = get_problem(name)
    x = np.random.default_rng(0).random((64, problem.num_variables))
    x[:4, 0] = [0.0, 1e-9, 1e-6, 1.0]  # edges of the box, where ZDT1's root is delicate
    ours = problem(torch.from_numpy(x)).numpy()
    theirs = pymoo_problem(problem).evaluate(x)
    assert np.allclose(ours, theirs, atol=3e-5)


@pytest.mark.parametrize("name", ["zdt1", "zdt2", "dtlz2"])
def test_fronts_match_pymoo(name):
    problem = get_problem(name)
    if name == "dtlz2":
        from pymoo.util.ref_dirs import get_reference_directions

        reference = pymoo_problem(problem).pareto_front(
            get_reference_directions("das-dennis", 3, n_partitions=12)
        )
    else:
        reference = pymoo_problem(problem).pareto_front()
    ours = problem.pareto_front()
    # Every pymoo front point lies on our dense front, and our front points on pymoo's
    # surface (same equation, checked through the distances to the dense sample).
    distance = np.min(np.linalg.norm(reference[:, None] - ours[None], axis=-1), axis=1)
    assert distance.max() < 0.02
    assert pareto_mask(ours, maximize=False).all()  # mutually non-dominated


def test_vlmop2_front_is_the_image_of_its_pareto_set():
    problem = get_problem("vlmop2", num_variables=3)
    t = torch.linspace(-1, 1, 201, dtype=torch.float64) / math.sqrt(3)
    images = problem(t[:, None].expand(-1, 3)).numpy()
    front = problem.pareto_front()
    distance = np.min(np.linalg.norm(images[:, None] - front[None], axis=-1), axis=1)
    assert distance.max() < 1e-3
    assert pareto_mask(front, maximize=False).all()
    # Off the diagonal segment a point is dominated by a point of the front.
    off = problem(torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64)).numpy()
    assert not pareto_mask(np.vstack([front, off]), maximize=False)[-1]


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_true_hypervolume(name):
    problem = get_problem(name)
    dense = hypervolume(problem.pareto_front(), problem.reference_point, maximize=False)
    # A finite sample of the front never dominates more than the front itself.
    assert dense <= problem.true_hypervolume + 1e-12
    assert problem.true_hypervolume - dense < (1e-4 if problem.num_objectives == 2 else 1e-2)
    assert hypervolume_gap(problem, problem.pareto_front()) == pytest.approx(
        problem.true_hypervolume - dense
    )
    closed_form = {
        "zdt1": 1.21 - 1 / 3,
        "zdt2": 1.21 - 2 / 3,
        "dtlz2": 1.331 - math.pi / 6,  # the box minus the unit ball's octant
    }
    if name in closed_form:
        assert problem.true_hypervolume == pytest.approx(closed_form[name])


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_problems_are_batched_and_differentiable(name):
    problem = get_problem(name)
    lower, upper = problem.bounds
    x = lower + (upper - lower) * torch.rand(2, 3, problem.num_variables, dtype=torch.float64)
    x[0, 0] = lower  # a corner of the box: gradients must stay finite there
    x.requires_grad_(True)
    values = problem(x)
    assert values.shape == (2, 3, problem.num_objectives)
    assert torch.allclose(values[1, 2], problem(x[1, 2]))
    values.sum().backward()
    assert torch.isfinite(x.grad).all()
    # Differentiable: autograd's Jacobian is the finite-difference one, inside the box.
    inside = lower + (upper - lower) * (0.1 + 0.8 * torch.rand(3, problem.num_variables))
    assert torch.autograd.gradcheck(problem, (inside.double().requires_grad_(True),))


def test_zdt1_pulls_x1_off_the_boundary():
    x = torch.zeros(30, dtype=torch.float64, requires_grad=True)
    get_problem("zdt1")(x)[1].backward()
    assert x.grad[0] < 0  # f2 decreases as x1 leaves 0


@pytest.mark.parametrize(
    "bad", [torch.zeros(29), torch.zeros(2, 31), torch.zeros(30, dtype=torch.long)]
)
def test_problem_input_errors(bad):
    with pytest.raises(ValueError, match="zdt1"):
        get_problem("zdt1")(bad)


def test_unknown_problem():
    with pytest.raises(ValueError, match="available"):
        get_problem("zdt7")


# --- finite-set solver ---------------------------------------------------------------------


def linear_optimum_gap(problem, alphas):
    """HV gap of the exact linear-scalarization optima on ZDT1's front: f1 = (α2 / 2α1)²."""
    f1 = np.minimum(1.0, (alphas[:, 1] / (2 * alphas[:, 0])) ** 2)
    return hypervolume_gap(problem, np.stack([f1, 1 - np.sqrt(f1)], 1))


def test_finite_set_linear_on_zdt1_reaches_its_optima(script):
    problem = get_problem("zdt1")
    alphas = script.finite_preferences(2)
    result = solve_finite_set(problem, "linear", alphas, **script.solver_options("finite"))
    assert result.preference_based and result.objectives.shape == (11, 2)
    assert (result.solutions >= 0).all() and (result.solutions <= 1).all()
    # The best linear scalarization can do with these α (its optima bunch at f1 = 1).
    floor = linear_optimum_gap(problem, alphas.numpy())
    assert hypervolume_gap(problem, result.objectives) < floor + 0.01


def test_zdt2_smooth_tchebycheff_beats_tchebycheff_and_linear(script):
    """At the evaluation script's defaults (the same steps and learning rate for all)."""
    problem = get_problem("zdt2")
    alphas = script.finite_preferences(2)
    gaps = {
        method: hypervolume_gap(
            problem,
            solve_finite_set(problem, method, alphas, **script.solver_options("finite")).objectives,
        )
        for method in ("linear", "tchebycheff", "smooth_tchebycheff")
    }
    assert gaps["smooth_tchebycheff"] < gaps["tchebycheff"] < gaps["linear"]
    # Linear scalarization can only reach the two ends of the concave front.
    assert gaps["linear"] == pytest.approx(problem.true_hypervolume - 0.21, abs=1e-3)


def test_finite_set_is_deterministic_and_seeded():
    problem = get_problem("vlmop2")
    alphas = simplex_grid(2, 4)
    run = [solve_finite_set(problem, "stch", alphas, steps=20, seed=s) for s in (0, 0, 1)]
    assert np.array_equal(run[0].objectives, run[1].objectives)
    assert not np.array_equal(run[0].objectives, run[2].objectives)


def test_finite_set_methods_that_ignore_preferences_still_give_k_points():
    problem = get_problem("vlmop2")
    result = solve_finite_set(problem, "famo", simplex_grid(2, 4), steps=10)
    assert not result.preference_based and result.objectives.shape == (5, 2)
    # K different starts give K different solutions.
    assert len(np.unique(result.objectives.round(6), axis=0)) == 5


def test_finite_set_learns_uncertainty_log_variances(monkeypatch):
    # A callable with bounds, not a built-in problem; UW's parameters join the optimizer.
    def objective(x):
        return torch.stack([(x**2).sum(-1), ((x - 1) ** 2).sum(-1)], -1)

    made = []

    def recording(*args, **kwargs):
        made.append(make_method(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(solvers, "make_method", recording)
    result = solve_finite_set(
        objective, "uw", simplex_grid(2, 1), bounds=([-2.0] * 3, [2.0] * 3), steps=100
    )
    assert np.isfinite(result.objectives).all() and result.objectives.shape == (2, 2)
    # UW minimises exp(-s_i) L_i + s_i: each log-variance s_i left 0 towards its optimum
    # log L_i at the solution (large for the objective left behind, very negative for the one
    # reached), one instance per solution.
    for method, losses in zip(made[: len(result.objectives)], result.objectives, strict=True):
        learned = method.log_variances.detach().double().numpy()
        optimum = np.log(losses)
        assert (np.sign(learned) == np.sign(optimum)).all()
        assert (np.abs(learned - optimum) < np.abs(optimum)).all()


def test_finite_set_gradient_level_method_reaches_pareto_stationarity():
    assert "mgda" in available_aggregators()  # a registry regression fails here, not a skip
    problem = get_problem("vlmop2")
    result = solve_finite_set(problem, "mgda", simplex_grid(2, 4), steps=200, optimizer="adam")
    # VLMOP2's Pareto set is the diagonal x1 = x2 with |x| ≤ 1/√2.
    x = result.solutions
    assert torch.allclose(x[:, 0], x[:, 1], atol=0.05)
    assert (x.abs() <= 1 / math.sqrt(2) + 0.05).all()


def test_solver_input_errors():
    problem = get_problem("zdt1")
    with pytest.raises(ValueError, match="sum"):
        solve_finite_set(problem, "stch", [[0.5, 0.6]], steps=1)
    with pytest.raises(ValueError, match=r"\(K, 2\)"):
        solve_finite_set(problem, "stch", [[0.2, 0.3, 0.5]], steps=1)
    with pytest.raises(ValueError, match="bounds"):
        solve_finite_set(lambda x: x, "stch", [[0.5, 0.5]], steps=1)
    with pytest.raises(ValueError, match="vmap"):
        solve_finite_set(lambda x: x.sum(), "linear", [[0.5, 0.5]], bounds=([0.0], [1.0]))
    with pytest.raises(ValueError, match="unknown multi-gradient method"):
        solve_finite_set(problem, "nope", [[0.5, 0.5]], steps=1)
    with pytest.raises(ValueError, match="optimizer"):
        solve_finite_set(problem, "stch", [[0.5, 0.5]], steps=1, optimizer="lbfgs")


def test_method_helpers():
    names = method_names()
    assert {"linear", "tchebycheff", "smooth_tchebycheff", "famo", "uncertainty"} <= set(names)
    assert "stch" not in names and "uw" not in names  # aliases dropped
    assert make_method("uw", 4).log_variances.numel() == 4
    assert responds_to_preference("linear", 2)  # α optional, but used when given
    assert responds_to_preference("stch", 3)
    assert not responds_to_preference("dwa", 2)


# --- Pareto set learning -------------------------------------------------------------------


# Small settings, explicitly: the defaults are the paper's protocol (512-unit layers, 2,000 steps).
SMALL_PSL = {"hidden": 64, "lr": 1e-2}


def test_pareto_set_learning_defaults_are_the_smooth_tchebycheff_papers_protocol(script):
    defaults = inspect.signature(pareto_set_learning).parameters
    paper = {"hidden": 512, "steps": 2000, "lr": 1e-3, "batch_size": 10, "concentration": 1.0}
    assert {key: defaults[key].default for key in paper} == paper == PSL_PROTOCOL
    model = ParetoSetModel(
        torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64), 2
    )
    assert [layer.out_features for layer in model.net if isinstance(layer, nn.Linear)] == [
        512,
        512,
        5,
    ]
    assert script.solver_options("psl") == {"steps": 2000, "lr": 1e-3}
    settings = {"optimizer": "adam", **script.solver_options("psl"), **PSL_PROTOCOL}
    assert script.psl_protocol(settings).startswith("the smooth Tchebycheff paper's")
    changed = script.psl_protocol({**settings, "steps": 5})
    assert changed.startswith("NOT") and "steps 5 (paper 2000)" in changed


def test_pareto_set_learning_follows_preferences():
    problem = get_problem("vlmop2")
    result = pareto_set_learning(problem, "stch", steps=150, **SMALL_PSL)
    assert result.objectives.shape == (100, 2) and result.preference_based
    # More weight on f1 gives a smaller f1: the learned map is ordered along the front.
    f1 = result.objectives[:, 0]
    assert np.corrcoef(result.preferences[:, 0].numpy(), f1)[0, 1] < -0.9
    again = pareto_set_learning(problem, "stch", steps=150, **SMALL_PSL)
    assert np.array_equal(result.objectives, again.objectives)
    untrained = pareto_set_learning(problem, "stch", steps=0, **SMALL_PSL)
    assert hypervolume_gap(problem, result.objectives) < hypervolume_gap(
        problem, untrained.objectives
    )


def test_pareto_set_learning_with_a_method_that_ignores_preferences():
    alphas = [[1, 0], [0.5, 0.5], [0, 1]]
    runs = [
        pareto_set_learning(
            get_problem("vlmop2"), "dwa", steps=steps, hidden=64, eval_preferences=alphas
        )
        for steps in (0, 20)
    ]
    result = runs[1]
    assert not result.preference_based and result.objectives.shape == (3, 2)
    assert np.array_equal(result.preferences.numpy(), np.array(alphas, dtype=float))
    # It still learns: DWA's weighted sum falls at every α, from the untrained network's.
    assert (result.objectives.sum(1) < runs[0].objectives.sum(1) - 0.1).all()


@pytest.mark.slow
def test_pareto_set_learning_zdt2_smooth_tchebycheff_beats_linear(script):
    """At the script's defaults: the paper's protocol (about a minute per method here)."""
    problem = get_problem("zdt2")
    options = script.solver_options("psl")
    gaps = {
        method: hypervolume_gap(problem, pareto_set_learning(problem, method, **options).objectives)
        for method in ("linear", "tchebycheff", "smooth_tchebycheff")
    }
    assert gaps["smooth_tchebycheff"] < gaps["linear"]
    assert gaps["tchebycheff"] < gaps["linear"]


# --- the evaluation script -----------------------------------------------------------------


def test_script_writes_json_and_markdown(script, tmp_path, capsys):
    common = ["--problems", "zdt2", "--methods", "linear,stch,dwa", "--steps", "5"]
    report = script.main([*common, "--output", str(tmp_path / "gaps.json")])
    saved = json.loads((tmp_path / "gaps.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    by_method = {row["method"]: row for row in saved["results"]}
    assert set(by_method) == {"linear", "smooth_tchebycheff", "dwa"}
    assert by_method["dwa"]["preference_based"] is False
    assert all(row["gap"] >= 0 for row in saved["results"])
    script.main([*common, "--output", str(tmp_path / "gaps.md")])
    markdown = (tmp_path / "gaps.md").read_text()
    assert "| smooth_tchebycheff | α |" in markdown and "| dwa | K starts |" in markdown
    assert "HV gap" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["ml2o", "gml2o"])
def test_the_finite_set_solver_runs_update_level_methods_and_gml2o_descends(method):
    problem = get_problem("zdt1")
    alphas = [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    start = solve_finite_set(problem, method, alphas, steps=0).objectives
    end = solve_finite_set(problem, method, alphas, steps=30, lr=0.01).objectives
    assert end.shape == start.shape and np.isfinite(end).all()
    # It runs: every solution moved down (ML2O's learned direction is no guaranteed descent
    # per objective, but here the sum of the objectives falls at every α).
    assert (end.sum(1) < start.sum(1) - 0.1).all()
    if method == "gml2o":  # every step a common descent direction: no objective rises
        assert (end <= start + 1e-9).all() and (end < start).any()
