"""Loss-level methods: Tchebycheff, smooth Tchebycheff, DWA, uncertainty weighting, random
weighting, FAMO — properties, errors, and state that survives a resume."""

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from align.mograd import available_aggregators, get_aggregator
from align.mograd.engine import MultiObjectiveEngine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def simplex_point(draw, m):
    raw = draw(st.lists(st.floats(0.0, 1.0), min_size=m, max_size=m))
    weights = torch.tensor(raw, dtype=torch.float64) + 1e-3
    return weights / weights.sum()


@st.composite
def losses_and_preference(draw, m_min=2, m_max=5):
    m = draw(st.integers(m_min, m_max))
    losses = torch.tensor(
        draw(st.lists(st.floats(0.0, 10.0), min_size=m, max_size=m)), dtype=torch.float64
    )
    return losses, simplex_point(draw, m)


# --- registry ------------------------------------------------------------------------------


def test_registered_names_aliases_and_kinds():
    names = available_aggregators()
    expected = {
        "tchebycheff": "tch",
        "smooth_tchebycheff": "stch",
        "dwa": None,
        "uncertainty": "uw",
        "random_weighting": "rw",
        "famo": None,
    }
    for name, alias in expected.items():
        assert names[name] == "loss"
        if alias:
            assert type(get_aggregator(alias, **_needs(name))) is type(
                get_aggregator(name, **_needs(name))
            )
    assert get_aggregator("tch").uses_preference and get_aggregator("stch").uses_preference
    for name in ("dwa", "random_weighting", "famo"):
        assert not get_aggregator(name).uses_preference
    assert not get_aggregator("uw", num_objectives=2).uses_preference


def _needs(name):
    return {"num_objectives": 3} if name == "uncertainty" else {}


# --- Tchebycheff and smooth Tchebycheff ----------------------------------------------------


@settings(deadline=None, max_examples=60)
@given(st.data())
def test_vertex_preference_reduces_to_the_single_loss(data):
    m = data.draw(st.integers(2, 5))
    j = data.draw(st.integers(0, m - 1))
    losses = torch.tensor(
        data.draw(st.lists(st.floats(0.01, 10.0), min_size=m, max_size=m)), dtype=torch.float64
    )
    ideal = data.draw(st.floats(-1.0, 0.0))
    mu = data.draw(st.sampled_from([1e-3, 1e-2, 0.1, 1.0]))
    vertex = torch.zeros(m, dtype=torch.float64)
    vertex[j] = 1.0
    assert float(get_aggregator("linear")(losses, vertex)) == pytest.approx(float(losses[j]))
    # z below every loss: the other terms are 0 < L_j − z_j.
    tch = float(get_aggregator("tch", ideal=ideal)(losses, vertex))
    assert tch == pytest.approx(float(losses[j]) - ideal)
    stch = float(get_aggregator("stch", ideal=ideal, mu=mu)(losses, vertex))
    assert tch - 1e-9 <= stch <= tch + mu * math.log(m) + 1e-9


@settings(deadline=None, max_examples=80)
@given(losses_and_preference(), st.floats(1e-3, 2.0), st.floats(-2.0, 2.0))
def test_smooth_tchebycheff_bounds(case, mu, ideal):
    losses, alpha = case
    tch = float(get_aggregator("tch", ideal=ideal)(losses, alpha))
    stch = float(get_aggregator("stch", ideal=ideal, mu=mu)(losses, alpha))
    assert tch - 1e-9 <= stch <= tch + mu * math.log(len(losses)) + 1e-9


@settings(deadline=None, max_examples=40)
@given(losses_and_preference())
def test_smooth_tchebycheff_tends_to_tchebycheff(case):
    losses, alpha = case
    tch = float(get_aggregator("tch")(losses, alpha))
    gaps = [
        float(get_aggregator("stch", mu=mu)(losses, alpha)) - tch for mu in (1.0, 0.1, 1e-2, 1e-4)
    ]
    assert all(a >= b - 1e-12 for a, b in zip(gaps, gaps[1:]))  # shrinks with μ
    assert gaps[-1] <= 1e-4 * math.log(len(losses)) + 1e-12


@pytest.mark.parametrize("name", ["tch", "stch"])
def test_last_weights_are_the_gradient(name):
    losses = torch.tensor([0.9, 0.4, 0.7], dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    method = get_aggregator(name, ideal=[0.1, 0.0, -0.2], nadir=[2.0, 1.0, 1.5])
    method(losses, alpha).backward()
    assert torch.allclose(losses.grad, method.last_weights)
    if name == "tch":  # one active objective
        assert (method.last_weights > 0).sum() == 1


def test_tchebycheff_reaches_what_linear_cannot():
    # Two points on the concave front f2 = 1 − f1² and its middle point: for α = (½, ½)
    # linear scalarization prefers an end point, Tchebycheff the middle.
    alpha = torch.tensor([0.5, 0.5])
    end, middle = torch.tensor([0.0, 1.0]), torch.tensor([0.6, 0.64])
    linear, tch = get_aggregator("linear"), get_aggregator("tch")
    assert linear(end, alpha) < linear(middle, alpha)
    assert tch(middle, alpha) < tch(end, alpha)


def test_running_ideal_and_warmup_nadir():
    method = get_aggregator("stch", ideal="running", margin=0.05, nadir="warmup", warmup_steps=4)
    alpha = torch.tensor([0.5, 0.5])
    first = torch.tensor([2.0, 4.0])
    # Before anything is observed the ideal sits just below the current losses.
    assert torch.allclose(method.ideal_point(first), first - 0.05)
    observed = [torch.tensor(v) for v in ([2.0, 4.0], [1.0, 3.0], [1.5, 2.0], [0.5, 2.5])]
    for losses in observed:
        method(losses, alpha)
        assert method.nadir_point.numel() == 0  # warming up: not normalising yet
        method.observe(losses)
    assert torch.allclose(method.running_min, torch.tensor([0.5, 2.0], dtype=torch.float64))
    # The nadir is the mean over the warm-up's second half (steps 3 and 4).
    assert torch.allclose(method.nadir_point, torch.tensor([1.0, 2.25], dtype=torch.float64))
    # At the nadir every normalised term is α_i: STCH = μ log Σ exp(α_i / μ).
    nadir = method.nadir_point.float()
    expected = method.mu * math.log(2 * math.exp(0.5 / method.mu))
    assert float(method(nadir, alpha)) == pytest.approx(expected, rel=1e-5)


def test_fixed_nadir_normalises_scales():
    # Objective 2 is the same as objective 1 on a 100× scale: normalised, α = (½, ½) treats
    # them alike (both terms equal, weights in the ratio of the scales).
    method = get_aggregator("tch", nadir=[1.0, 100.0])
    method(torch.tensor([0.5, 50.0]), torch.tensor([0.5, 0.5]))
    assert torch.allclose(method.last_weights, torch.tensor([0.25, 0.0025]))


@pytest.mark.parametrize(
    "losses",
    [torch.ones(2, 2), torch.ones(0), torch.tensor([1.0, float("nan")]), torch.tensor(1.0)],
)
@pytest.mark.parametrize("name", ["tch", "stch", "dwa", "rw", "famo"])
def test_bad_losses_raise(name, losses):
    with pytest.raises(ValueError, match="losses"):
        get_aggregator(name)(losses, torch.full((2,), 0.5))


@pytest.mark.parametrize(
    "alpha, match",
    [
        (None, "preference-based"),
        ([0.5, 0.5, 0.0], r"shape \(2,\)"),
        ([1.5, -0.5], ">= 0"),
        ([0.3, 0.3], "sum to 1"),
        ([float("nan"), 1.0], "finite"),
    ],
)
@pytest.mark.parametrize("name", ["tch", "stch"])
def test_bad_preferences_raise(name, alpha, match):
    with pytest.raises(ValueError, match=match):
        get_aggregator(name)(torch.tensor([1.0, 2.0]), alpha)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("stch", {"mu": 0}, "mu"),
        ("stch", {"mu": float("inf")}, "mu"),
        ("tch", {"ideal": "ideal"}, "ideal"),
        ("tch", {"ideal": [[0.0]]}, "ideal"),
        ("tch", {"nadir": "max"}, "nadir"),
        ("tch", {"ideal": 1.0, "nadir": [2.0, 0.5]}, "above the ideal"),
        ("tch", {"warmup_steps": 0}, "warmup_steps"),
        ("tch", {"margin": -1}, "margin"),
        ("dwa", {"temperature": 0}, "temperature"),
        ("dwa", {"period": 0}, "period"),
        ("uw", {}, "num_objectives"),
        ("rw", {"seed": -1}, "seed"),
        ("famo", {"lr": -1.0}, "lr"),
    ],
)
def test_bad_options_raise(name, options, match):
    with pytest.raises(ValueError, match=match):
        get_aggregator(name, **options)


def test_reference_point_errors_at_call_time():
    with pytest.raises(ValueError, match="3 reference values for 2 objectives"):
        get_aggregator("tch", ideal=[0.0, 0.0, 0.0])(torch.ones(2), torch.full((2,), 0.5))
    method = get_aggregator("tch", nadir="warmup", warmup_steps=1)
    method.observe(torch.tensor([-1.0, 1.0]))  # a nadir below the fixed ideal 0
    with pytest.raises(ValueError, match="not above the ideal"):
        method(torch.ones(2), torch.full((2,), 0.5))


# --- DWA -----------------------------------------------------------------------------------


def test_dwa_weights_the_slower_loss():
    dwa = get_aggregator("dwa")
    for losses in ([1.0, 1.0], [0.5, 0.95]):  # loss 1 halves, loss 2 barely moves
        dwa(torch.tensor(losses), None)
        assert torch.allclose(dwa.last_weights, torch.full((2,), 0.5))  # < 2 history entries
        dwa.observe(torch.tensor(losses))
    dwa(torch.tensor([0.5, 0.95]), None)
    expected = torch.softmax(torch.tensor([0.5, 0.95]) / 2.0, 0)
    assert torch.allclose(dwa.last_weights, expected)
    assert dwa.last_weights[1] > dwa.last_weights[0]
    assert float(dwa.last_weights.sum()) == pytest.approx(1.0)
    # A very high temperature gives back the plain mean.
    hot = get_aggregator("dwa", temperature=1e9)
    hot.load_state_dict(dwa.state_dict())
    assert float(hot(torch.tensor([1.0, 3.0]), None)) == pytest.approx(2.0)


def test_dwa_period_averages_observations():
    dwa = get_aggregator("dwa", period=2)
    for losses in ([1.0, 1.0], [3.0, 1.0], [1.0, 1.0], [1.0, 1.0]):
        dwa.observe(torch.tensor(losses))
    # Entries: mean of the first two (2, 1), then of the last two (1, 1).
    ratios = torch.tensor([0.5, 1.0])
    dwa(torch.ones(2), None)
    assert torch.allclose(dwa.last_weights, torch.softmax(ratios / 2.0, 0))


# --- uncertainty weighting -----------------------------------------------------------------


def test_uncertainty_weighting_learns_log_losses():
    uw = get_aggregator("uw", num_objectives=2)
    assert [p.shape for p in uw.parameters()] == [torch.Size([2])]
    losses = torch.tensor([0.2, 5.0])
    optimizer = torch.optim.SGD(uw.parameters(), lr=0.5)
    for _ in range(200):
        optimizer.zero_grad()
        uw(losses, None).backward()
        optimizer.step()
    # The optimum of ½ e^{−s} L + ½ s is s = log L, i.e. weight 1 / (2 L).
    assert torch.allclose(uw.log_variances.detach(), losses.log(), atol=1e-2)
    assert torch.allclose(uw.last_weights, 0.5 / losses, rtol=2e-2)
    with pytest.raises(ValueError, match="built for 2 objectives"):
        uw(torch.ones(3), None)


# --- random weighting ----------------------------------------------------------------------


def test_random_weighting_is_seeded_and_on_the_simplex():
    a, b, c = (get_aggregator("rw", seed=s) for s in (7, 7, 8))
    draws = []
    for _ in range(5):
        a(torch.ones(3), None)
        b(torch.ones(3), None)
        c(torch.ones(3), None)
        assert torch.equal(a.last_weights, b.last_weights)
        assert not torch.equal(a.last_weights, c.last_weights)
        assert float(a.last_weights.sum()) == pytest.approx(1.0)
        assert (a.last_weights > 0).all()
        draws.append(a.last_weights)
    assert len({tuple(d.tolist()) for d in draws}) == 5  # fresh weights every call


# --- FAMO ----------------------------------------------------------------------------------


def test_famo_gradient_and_weights():
    famo = get_aggregator("famo")
    losses = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    famo(losses, None).backward()
    # Equal logits: weights ∝ 1 / L, summing to 1, and the scalar's gradient is those weights.
    assert torch.allclose(famo.last_weights, torch.tensor([0.8, 0.2], dtype=torch.float64))
    assert torch.allclose(losses.grad, famo.last_weights)


def test_famo_moves_weight_to_the_loss_that_did_not_improve():
    famo = get_aggregator("famo")
    reference = torch.zeros(2, requires_grad=True)
    adam = torch.optim.Adam([reference], lr=0.025, weight_decay=1e-3)
    before, after = torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.99])
    for _ in range(3):
        famo(before, None)
        famo.observe(after)
        # The same update, written with autograd and torch's Adam.
        delta = before.log() - after.log()
        adam.zero_grad()
        (torch.softmax(reference, 0) * delta).sum().backward()
        adam.step()
    assert torch.allclose(famo.logits.float(), reference.detach(), atol=1e-6)
    assert famo.logits[1] > famo.logits[0]
    famo.observe(after)  # no combine since the last observe: nothing happens
    assert int(famo.adam_steps) == 3


def test_famo_refuses_losses_below_the_bound():
    with pytest.raises(ValueError, match="min_losses"):
        get_aggregator("famo", min_losses=1.0)(torch.tensor([0.5, 2.0]), None)


# --- state that survives a resume ----------------------------------------------------------


STATEFUL = [
    ("tch", {"ideal": "running", "nadir": "warmup", "warmup_steps": 3}),
    ("stch", {"ideal": "running", "nadir": "warmup", "warmup_steps": 3}),
    ("dwa", {"period": 2}),
    ("rw", {"seed": 3}),
    ("famo", {}),
    ("uw", {"num_objectives": 3}),
]


def _steps(method, losses_list, alpha, optimizer=None):
    weights = []
    for losses in losses_list:
        value = method(losses, alpha)
        if optimizer is not None:
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
        method.observe(losses * 0.9)
        weights.append(method.last_weights.clone())
    return weights


@pytest.mark.parametrize("name, options", STATEFUL, ids=[s[0] for s in STATEFUL])
def test_state_dict_round_trip(name, options):
    generator = torch.Generator().manual_seed(0)
    losses_list = [torch.rand(3, generator=generator) + 0.1 for _ in range(12)]
    alpha = torch.tensor([0.2, 0.3, 0.5])
    first = get_aggregator(name, **options)
    optimizer = torch.optim.SGD(first.parameters(), lr=0.1) if name == "uw" else None
    _steps(first, losses_list[:6], alpha, optimizer)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = get_aggregator(name, **options)  # fresh: lazily sized state adopts the saved one
    resumed.load_state_dict(torch.load(buffer))
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1) if name == "uw" else None
    expected = _steps(first, losses_list[6:], alpha, optimizer)
    got = _steps(resumed, losses_list[6:], alpha, resumed_optimizer)
    for a, b in zip(expected, got):
        assert torch.allclose(a, b)
    # A different number of objectives is refused, not silently broadcast.
    if name in ("tch", "stch", "dwa", "famo"):
        with pytest.raises(ValueError):
            for _ in range(3):
                resumed(torch.ones(2), torch.full((2,), 0.5))
                resumed.observe(torch.ones(2))


def test_engine_runs_a_preference_based_scalarization():
    x = torch.nn.Parameter(torch.tensor([0.3, -0.2]))
    engine = MultiObjectiveEngine("stch", mu=0.05)
    losses = torch.stack([(x[0] - 1) ** 2, (x[1] + 1) ** 2])
    engine(losses, torch.tensor([0.5, 0.5])).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert engine.last_weights is not None
    manual = MultiObjectiveEngine("stch", ideal="running", observe="manual")
    manual(losses, torch.tensor([0.5, 0.5]))
    assert manual.aggregator.running_min.numel() == 0  # nothing observed until asked
    manual.observe(losses.detach())
    assert torch.equal(manual.aggregator.running_min, losses.detach().double())


# --- PBI and COSMOS (issue 15): agreement with torchjd's scalarizers ------------------------


@settings(max_examples=30, deadline=None, derandomize=True)
@given(losses_and_preference(m_min=1), st.sampled_from([0.0, 1.0, 5.0]), st.booleans())
def test_pbi_agrees_with_torchjd(case, theta, shifted):
    from torchjd.scalarization import PBI

    losses, alpha = case
    ideal = torch.linspace(-1.0, -0.5, losses.numel(), dtype=torch.float64) if shifted else None
    ours_losses = losses.clone().requires_grad_(True)
    options = {"theta": theta} | ({"ideal": ideal.tolist()} if shifted else {})
    method = get_aggregator("pbi", **options)
    value = method(ours_losses, alpha)
    value.backward()
    theirs_losses = losses.clone().requires_grad_(True)
    expected = PBI(theta, alpha, reference=ideal)(theirs_losses)
    expected.backward()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(ours_losses.grad, theirs_losses.grad)
    torch.testing.assert_close(method.last_weights, ours_losses.grad)


def test_pbi_is_minimised_on_the_preference_ray():
    """Among loss vectors at the same distance from the ideal point, PBI is smallest on the ray
    of α (d_2 = 0) — the point it converges to."""
    alpha = torch.tensor([0.25, 0.75], dtype=torch.float64)
    method = get_aggregator("pbi")
    on_ray = alpha / alpha.norm()
    angles = torch.linspace(0.0, math.pi / 2, 41, dtype=torch.float64)
    values = [float(method(torch.stack([a.cos(), a.sin()]), alpha)) for a in angles]
    best = angles[int(torch.tensor(values).argmin())]
    assert abs(float(best) - math.atan2(float(on_ray[1]), float(on_ray[0]))) < 0.05
    with pytest.raises(ValueError, match="preference"):
        method(torch.ones(2))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(losses_and_preference(m_min=1), st.sampled_from([0.0, 0.01, 1.0, 8.0]))
def test_cosmos_agrees_with_torchjd(case, lambda_):
    from torchjd.scalarization import COSMOS

    losses, alpha = case
    losses = losses + 0.1  # the cosine's gradient is undefined at L = 0
    ours_losses = losses.clone().requires_grad_(True)
    method = get_aggregator("cosmos", lambda_=lambda_)
    value = method(ours_losses, alpha)
    value.backward()
    theirs_losses = losses.clone().requires_grad_(True)
    expected = COSMOS(lambda_, alpha)(theirs_losses)
    expected.backward()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(ours_losses.grad, theirs_losses.grad)
    torch.testing.assert_close(method.last_weights, ours_losses.grad)


def test_cosmos_without_the_penalty_is_linear_scalarization():
    losses = torch.tensor([0.5, 2.0, 1.0])
    alpha = torch.tensor([0.2, 0.3, 0.5])
    assert torch.equal(
        get_aggregator("cosmos", lambda_=0.0)(losses, alpha),
        get_aggregator("linear")(losses, alpha),
    )
    with pytest.raises(ValueError, match="lambda_"):
        get_aggregator("cosmos", lambda_=-1.0)
