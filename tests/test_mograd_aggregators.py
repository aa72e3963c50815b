"""Gradient-level aggregators: the properties each method promises, degenerate inputs for every
registered method, and agreement with torchjd (an independent implementation)."""

from __future__ import annotations

import copy
import importlib.util
import warnings

import numpy as np
import pytest
import torch
import torchjd.aggregation as torchjd_aggregation
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.optimize import lsq_linear

from align.mograd import available_aggregators, get_aggregator
from align.mograd.aggregators import solvers
from align.mograd.aggregators.solvers import nonneg_qp

SETTINGS = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@st.composite
def jacobians(draw, min_m: int = 1, max_m: int = 5, max_n: int = 20) -> torch.Tensor:
    """Random (m, n) float64 Jacobians with bounded entries; hypothesis also tries zeros,
    repeated rows and other degenerate shapes on its own."""
    m = draw(st.integers(min_m, max_m))
    n = draw(st.integers(1, max_n))
    # Entries are 0 or of magnitude ≥ 1e-8: products of two entries must not underflow, or the
    # Gram itself (the only input of these methods) is wrong before any method runs.
    elements = st.floats(-10, 10, allow_nan=False).map(lambda x: 0.0 if abs(x) < 1e-8 else x)
    return torch.from_numpy(draw(arrays(np.float64, (m, n), elements=elements)))


def gradient_methods() -> list[str]:
    """One name per registered gradient-level class (aliases collapsed)."""
    names = {}
    for name, kind in available_aggregators().items():
        if kind == "gradient":
            cls = type(get_aggregator(name))
            names[cls] = cls.name
    return sorted(names.values())


def extras(method, m: int, losses=None) -> dict:
    """The keyword arguments a method needs besides the Gram (EPO: losses and α)."""
    kwargs = {}
    if method.uses_losses:
        kwargs["losses"] = (
            torch.linspace(1.0, 2.0, m, dtype=torch.float64) if losses is None else losses
        )
    if method.uses_preference:
        kwargs["preference"] = torch.full((m,), 1.0 / m, dtype=torch.float64)
    return kwargs


def scale_of(jac: torch.Tensor) -> float:
    """‖J‖_F², the natural scale of inner products g_i · d for weights of order 1."""
    return float((jac**2).sum())


# --------------------------------------------------------------------------------------------
# Registry


def test_registered_names_and_aliases():
    names = available_aggregators()
    for name in ("mgda", "pcgrad", "cagrad", "imtl_g", "imtlg", "nash_mtl", "nashmtl", "upgrad"):
        assert names.get(name) == "gradient", name
    assert names.get("epo") == "gradient"
    assert type(get_aggregator("IMTL-G")) is type(get_aggregator("imtlg"))
    assert type(get_aggregator("NashMTL")) is type(get_aggregator("nash_mtl"))
    # Private modules (solvers) register nothing.
    for name in gradient_methods():
        assert not type(get_aggregator(name)).__module__.split(".")[-1].startswith("_")
    with pytest.raises(ValueError, match="bad options"):
        get_aggregator("mgda", no_such_option=1)


# --------------------------------------------------------------------------------------------
# The shared solvers


@SETTINGS
@given(jacobians(), st.data())
def test_nonneg_qp_matches_bounded_least_squares(jac, data):
    """UPGrad's projection QP ``min ‖Jᵀv‖² s.t. v ≥ u`` against SciPy's BVLS on J itself."""
    m, n = jac.shape
    assume(scale_of(jac) > 1e-6)
    u = np.array(data.draw(st.lists(st.floats(0, 1), min_size=m, max_size=m)))
    j = jac.numpy() / np.sqrt(scale_of(jac))
    v = solvers.dual_cone_weights(j @ j.T, u)
    ref = lsq_linear(j.T, np.zeros(n), bounds=(u, np.full(m, np.inf)), method="bvls", tol=1e-14)
    assert (v >= u - 1e-12).all()
    # The projection Jᵀv is unique even when v is not (dependent rows).
    np.testing.assert_allclose(v @ j, ref.x @ j, atol=1e-7)


def test_nonneg_qp_simple_cases():
    # Unconstrained optimum inside the orthant, on its boundary, and a singular Q.
    np.testing.assert_allclose(nonneg_qp(np.eye(2), np.array([-1.0, -2.0])), [1.0, 2.0])
    np.testing.assert_allclose(nonneg_qp(np.eye(2), np.array([-1.0, 2.0])), [1.0, 0.0])
    x = nonneg_qp(np.ones((2, 2)), np.array([-1.0, -1.0]))
    assert x.min() >= 0 and x.sum() == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# MGDA


@SETTINGS
@given(jacobians())
def test_mgda_is_the_min_norm_common_descent_direction(jac):
    """``w ∈ Δ`` and ``g_i · d ≥ ‖d‖²`` for every i: that is the optimality condition of the
    min-norm point, and it makes d a common descent direction (``g_i · d ≥ 0``). It certifies
    minimality: for any convex combination p, ``d · p ≥ ‖d‖²`` so ``‖p‖ ≥ ‖d‖``; we also check
    the vertices, edge midpoints and random points directly."""
    mgda = get_aggregator("mgda")
    d = mgda(jac)
    w = mgda.last_weights
    tol = 1e-9 * scale_of(jac) + 1e-300
    assert (w >= 0).all() and float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    inner = jac @ d
    assert (inner >= -tol).all()
    assert (inner >= d @ d - tol).all()
    m = jac.shape[0]
    rng = np.random.default_rng(0)
    candidates = [np.eye(m)[i] for i in range(m)]
    candidates += [(np.eye(m)[i] + np.eye(m)[j]) / 2 for i in range(m) for j in range(i)]
    candidates += list(rng.dirichlet(np.ones(m), size=20))
    for p in candidates:
        point = torch.from_numpy(p) @ jac
        assert float(d @ d) <= float(point @ point) + tol


def test_mgda_two_gradients_closed_form():
    g1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g2 = torch.tensor([-0.5, 2.0], dtype=torch.float64)
    d = get_aggregator("mgda")(torch.stack([g1, g2]))
    gamma = float((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)))  # weight on g1
    torch.testing.assert_close(d, gamma * g1 + (1 - gamma) * g2)
    # The min-norm point of a segment is orthogonal to it when interior.
    assert float(d @ (g1 - g2)) == pytest.approx(0.0, abs=1e-12)
    # A vertex: g2 = 2 g1 gives the shorter one.
    d = get_aggregator("mgda")(torch.stack([g1, 2 * g1]))
    torch.testing.assert_close(d, g1)


def test_mgda_frank_wolfe_is_exact_on_vertices_and_edges_and_close_elsewhere():
    # Solution on the edge [g1, g2]; g3 is far and agrees with it, so it gets weight 0.
    jac = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 1.0]], dtype=torch.float64)
    exact = get_aggregator("mgda")(jac)
    fw = get_aggregator("mgda", solver="frank_wolfe")(jac)
    torch.testing.assert_close(exact, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(fw, exact, atol=1e-14, rtol=0)
    # Solution on a vertex.
    jac = torch.tensor([[1.0, 0.0], [3.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    fw = get_aggregator("mgda", solver="frank_wolfe")(jac)
    torch.testing.assert_close(fw, jac[0], atol=1e-14, rtol=0)
    # Interior of the triangle: Frank-Wolfe approaches the exact answer.
    gen = torch.Generator().manual_seed(0)
    jac = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    exact = get_aggregator("mgda")(jac)
    fw = get_aggregator("mgda", solver="frank_wolfe", tol=1e-10, max_iters=5000)(jac)
    assert float(fw @ fw) >= float(exact @ exact) - 1e-12
    torch.testing.assert_close(fw, exact, atol=1e-3, rtol=0)


@SETTINGS
@given(jacobians(), st.floats(0.01, 100))
def test_mgda_l2_normalisation_ignores_gradient_magnitudes(jac, factor):
    """With "l2", MGDA sees unit gradients: scaling any one gradient by c > 0 leaves d as is."""
    assume((jac.norm(dim=1) > 1e-3).all())
    mgda = get_aggregator("mgda", normalization="l2")
    d = mgda(jac)
    scaled = jac.clone()
    scaled[0] *= factor
    torch.testing.assert_close(mgda(scaled), d, atol=1e-8 * float(jac.norm()), rtol=1e-7)
    # And d is the min-norm point of the unit gradients' hull.
    units = jac / jac.norm(dim=1, keepdim=True)
    torch.testing.assert_close(d, get_aggregator("mgda")(units), atol=1e-9, rtol=1e-7)


def test_mgda_loss_normalisations():
    jac = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    losses = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    d = get_aggregator("mgda", normalization="loss")(jac, losses=losses)
    torch.testing.assert_close(d, get_aggregator("mgda")(jac / losses[:, None]))
    d = get_aggregator("mgda", normalization="loss+")(jac, losses=losses)
    rows = jac / (losses * jac.norm(dim=1))[:, None]
    torch.testing.assert_close(d, get_aggregator("mgda")(rows))
    with pytest.raises(ValueError, match="losses"):
        get_aggregator("mgda", normalization="loss")(jac)
    with pytest.raises(ValueError, match="> 0"):
        get_aggregator("mgda", normalization="loss")(jac, losses=torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="normalization"):
        get_aggregator("mgda", normalization="l1")


# --------------------------------------------------------------------------------------------
# Invariances


#: Methods whose direction does not depend on the order of the objectives. PCGrad's does when
#: m ≥ 3 (it projects sequentially), so it is only checked with m ≤ 2; EPO's LP may break ties
#: between optimal vertices differently, so it makes no such promise.
PERMUTATION_INVARIANT = ("mgda", "upgrad", "imtl_g", "cagrad", "nash_mtl", "dualproj", "config")


@pytest.mark.parametrize("name", [*PERMUTATION_INVARIANT, "pcgrad"])
@SETTINGS
@given(jac=jacobians(), data=st.data())
def test_permuting_objectives_leaves_the_direction_unchanged(name, jac, data):
    m = jac.shape[0]
    if name == "pcgrad":
        assume(m <= 2)
    if name == "imtl_g":
        # IMTL-G inverts G: on a nearly singular G the answer is as ill-conditioned as G.
        assume(scale_of(jac) > 0 and np.linalg.cond(jac.numpy() @ jac.numpy().T) < 1e8)
    if name == "cagrad":
        # CAGrad adds c‖g0‖·g_w/‖g_w‖: when a gradient is tiny but not zero (1e-6 beside 1), the
        # inner objectives of "g_w = that gradient" and "g_w = 0" differ by less than the
        # solver's tolerance, yet the two give directions ‖g0‖/2 apart — a discontinuity of the
        # method, which either order may land on (found by hypothesis: rows 0, 1e-6, -1).
        norms = jac.norm(dim=1)
        assume(bool(((norms == 0) | (norms > 1e-3 * norms.max())).all()))
    perm = torch.tensor(data.draw(st.permutations(range(m))))
    d = get_aggregator(name)(jac)
    d_perm = get_aggregator(name)(jac[perm])
    # Nash-MTL's ‖d‖ is √m whatever J; the others scale with ‖J‖.
    size = float(jac.norm()) + (np.sqrt(m) if name == "nash_mtl" else 0.0)
    torch.testing.assert_close(d_perm, d, atol=1e-7 * size, rtol=1e-6)


#: What each method promises when J becomes c·J (c > 0): weights unchanged (so d → c d), except
#: Nash-MTL, whose d is unchanged (‖d‖ = √m) so weights → weights / c, and MGDA with "l2"
#: normalisation, whose d (min-norm point of the unit gradients) is unchanged.
SCALE_INVARIANT_WEIGHTS = (
    "mgda",
    "upgrad",
    "imtl_g",
    "cagrad",
    "pcgrad",
    "epo",
    "dualproj",
    "aligned_mtl",
    "config",
)


@pytest.mark.parametrize("name", [*SCALE_INVARIANT_WEIGHTS, "nash_mtl", "mgda_l2"])
@SETTINGS
@given(jac=jacobians(), c=st.sampled_from([1e-3, 0.37, 7.0, 1e3]))
def test_scaling_the_jacobian(name, jac, c):
    assume(scale_of(jac) > 1e-6)
    if name == "imtl_g":
        assume(np.linalg.cond(jac.numpy() @ jac.numpy().T) < 1e8)

    def make():
        if name == "mgda_l2":
            return get_aggregator("mgda", normalization="l2")
        return get_aggregator(name)

    agg = make()
    kwargs = extras(agg, jac.shape[0])
    d = agg(jac, **kwargs)
    w = agg.last_weights
    agg_c = make()
    d_c = agg_c(c * jac, **kwargs)
    w_c = agg_c.last_weights
    size = float(jac.norm())
    if name in SCALE_INVARIANT_WEIGHTS:
        torch.testing.assert_close(w_c, w, atol=1e-7 * float(w.abs().max() + 1), rtol=1e-6)
        torch.testing.assert_close(
            d_c, c * d, atol=1e-7 * c * size * float(w.abs().max() + 1), rtol=1e-6
        )
    else:
        torch.testing.assert_close(d_c, d, atol=1e-7 * (size + np.sqrt(jac.shape[0])), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Degenerate inputs, for every registered gradient-level method


def _degenerate_cases() -> dict[str, torch.Tensor]:
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    h = torch.tensor([0.3, 0.1, -1.0], dtype=torch.float64)
    return {
        "all zero": torch.zeros(3, 3, dtype=torch.float64),
        "one zero": torch.stack([g, torch.zeros(3, dtype=torch.float64), h]),
        "identical": torch.stack([g, g, g]),
        "opposed": torch.stack([g, -g]),
        "opposed plus one": torch.stack([g, -g, h]),
        "m = 1": g[None],
        "m = 1, zero": torch.zeros(1, 3, dtype=torch.float64),
        "rank deficient": torch.stack([g, h, g + h, 2 * g - h]),
        "n = 1": torch.tensor([[1.0], [-3.0], [2.0]], dtype=torch.float64),
        "tiny": 1e-20 * torch.stack([g, h]),
        "huge": 1e15 * torch.stack([g, h]),
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", gradient_methods())
def test_degenerate_inputs_give_finite_weights_in_the_grams_dtype(name, dtype):
    """Finite weights of the right shape and dtype, or a ValueError — but never a refusal of a
    single gradient or of identical gradients (the Gram of "huge" overflows in bfloat16, which
    the base class refuses)."""
    for case, jac in _degenerate_cases().items():
        jac = jac.to(dtype)
        agg = get_aggregator(name)
        kwargs = extras(agg, jac.shape[0])
        try:
            w = agg.weights(jac @ jac.T, **kwargs)
        except ValueError:
            assert case not in ("m = 1", "identical"), case
            continue
        assert w.shape == (jac.shape[0],), case
        assert w.dtype == dtype, case
        assert torch.isfinite(w).all(), (case, w)
        assert torch.isfinite(w @ jac).all(), case
    # Half precision still gives an answer (IMTL-G's eigenvalue cut-off is capped for it).
    jac = torch.tensor([[1.0, 0.0], [0.5, 1.0]], dtype=dtype)
    agg = get_aggregator(name)
    w = agg.weights(jac @ jac.T, **extras(agg, 2))
    assert w.abs().sum() > 0


@pytest.mark.parametrize("name", gradient_methods())
def test_identical_and_opposed_gradients(name):
    """Every method agrees on the two trivial geometries: identical gradients give a positive
    multiple of that gradient; exactly opposed ones (with equal α_i L_i for EPO) give d = 0."""
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    agg = get_aggregator(name)
    d = agg(torch.stack([g, g]), **extras(agg, 2, losses=torch.ones(2, dtype=torch.float64)))
    k = float(d @ g) / float(g @ g)
    assert k > 0
    torch.testing.assert_close(d, k * g)
    d = agg(torch.stack([g, -g]), **extras(agg, 2, losses=torch.ones(2, dtype=torch.float64)))
    assert float(d.norm()) <= 1e-7 * float(g.norm())


def test_methods_refuse_bad_grams():
    for name in gradient_methods():
        agg = get_aggregator(name)
        with pytest.raises(ValueError):
            agg.weights(torch.ones(2, 3))
        with pytest.raises(ValueError):
            agg.weights(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), **extras(agg, 2))


# --------------------------------------------------------------------------------------------
# Method-specific promises


#: Methods that promise d conflicts with no gradient (g_i · d ≥ 0). Nash-MTL only where its
#: equation has a solution: zero outside the convex hull of the gradients (MGDA's d ≠ 0).
NON_CONFLICTING = ("mgda", "upgrad", "nash_mtl", "dualproj")


@pytest.mark.parametrize("name", NON_CONFLICTING)
@SETTINGS
@given(jac=jacobians())
def test_non_conflicting(name, jac):
    size = float(jac.norm())
    if name == "nash_mtl":
        assume(float(get_aggregator("mgda")(jac).norm()) > 1e-3 * size)
        size = np.sqrt(jac.shape[0]) * size
    d = get_aggregator(name)(jac)
    assert (jac @ d >= -1e-7 * size * float(jac.norm())).all()


@SETTINGS
@given(jacobians(min_m=2))
def test_upgrad_projects_each_gradient_onto_the_dual_cone(jac):
    """d = mean of π(g_i); each projection is checked against SciPy's bounded least squares."""
    assume(scale_of(jac) > 1e-6)
    m, n = jac.shape
    d = get_aggregator("upgrad")(jac)
    j = jac.numpy()
    total = np.zeros(n)
    for i in range(m):
        u = np.eye(m)[i] / m
        v = lsq_linear(j.T, np.zeros(n), bounds=(u, np.full(m, np.inf)), method="bvls", tol=1e-14)
        total += v.x @ j
    np.testing.assert_allclose(d.numpy(), total, atol=1e-6 * np.linalg.norm(j), rtol=1e-6)


def test_upgrad_uses_the_preference_as_its_pref_vector():
    jac = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    pref = torch.tensor([0.8, 0.2], dtype=torch.float64)
    upgrad = get_aggregator("upgrad")
    d_pref = upgrad(jac, preference=pref)
    d_mean = upgrad(jac)
    assert not torch.allclose(d_pref, d_mean)
    assert (jac @ d_pref >= -1e-12).all()


@SETTINGS
@given(jacobians(min_m=2))
def test_imtl_g_has_equal_projections_on_the_unit_gradients(jac):
    g = jac.numpy() @ jac.numpy().T
    assume(scale_of(jac) > 1e-6 and np.linalg.cond(g) < 1e8)
    imtl = get_aggregator("imtl_g")
    d = imtl(jac)
    w = imtl.last_weights
    projections = (jac @ d) / jac.norm(dim=1)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close(
        projections,
        projections.mean().expand_as(projections),
        atol=1e-6 * float(jac.norm()),
        rtol=1e-6,
    )


@SETTINGS
@given(jacobians(min_m=2), st.floats(0.05, 3.0))
def test_cagrad_solves_its_max_min_problem(jac, c):
    """CAGrad's d maximises ``min_i g_i · d`` over the ball ``‖d − g₀‖ ≤ c‖g₀‖``. Weak duality
    certifies it: for every w ∈ Δ and feasible d, ``min_i g_i · d ≤ F(w) = g_w · g₀ + c‖g₀‖‖g_w‖``;
    the w inside CAGrad's own weights (``1/m + λw``) must close that gap."""
    assume(scale_of(jac) > 1e-6)
    m = jac.shape[0]
    cagrad = get_aggregator("cagrad", c=c, rescale=False)
    d = cagrad(jac)
    weights = cagrad.last_weights
    g0 = jac.mean(dim=0)
    radius = c * float(g0.norm())
    size = scale_of(jac)
    assume(radius > 1e-6 * np.sqrt(size))
    if float(weights.abs().max()) == 0.0:
        # No update: zero is in the hull and nothing in the ball improves every objective.
        assert float(get_aggregator("mgda")(jac).norm()) <= 1e-6 * np.sqrt(size)
        return
    assert float((d - g0).norm()) <= radius * (1 + 1e-6) + 1e-9 * np.sqrt(size)
    excess = weights - 1.0 / m
    w = excess / excess.sum()
    gw = w @ jac
    dual = float(gw @ g0) + radius * float(gw.norm())
    assert float((jac @ d).min()) >= dual - 1e-6 * size


def test_cagrad_options():
    jac = torch.tensor([[1.0, 0.2], [-0.5, 1.0], [0.1, -0.3]], dtype=torch.float64)
    torch.testing.assert_close(get_aggregator("cagrad", c=0.0)(jac), jac.mean(dim=0))
    plain = get_aggregator("cagrad", c=0.5, rescale=False)(jac)
    torch.testing.assert_close(get_aggregator("cagrad", c=0.5)(jac), plain / 1.25)
    with pytest.raises(ValueError):
        get_aggregator("cagrad", c=-1.0)


@SETTINGS
@given(jacobians(min_m=2))
def test_nash_mtl_solves_its_bargaining_equation(jac):
    """``G α = 1/α`` (so ``g_i · d = 1/α_i`` and ``‖d‖² = m``) where a solution exists: here,
    independent gradients."""
    g = jac.numpy() @ jac.numpy().T
    assume(scale_of(jac) > 1e-6 and np.linalg.cond(g) < 1e4)
    nash = get_aggregator("nash_mtl")
    d = nash(jac)
    alpha = nash.last_weights
    assert (alpha > 0).all()
    residual = (jac @ d) * alpha - 1.0  # α_i (Gα)_i − 1
    assert float(residual.abs().max()) <= 1e-5
    assert float(d @ d) == pytest.approx(jac.shape[0], rel=1e-5)


def test_nash_mtl_max_norm():
    jac = torch.tensor([[1.0, 0.0], [0.5, 2.0], [-0.2, 1.0]], dtype=torch.float64)
    d = get_aggregator("nash_mtl", max_norm=1.0)(jac)
    assert float(d.norm()) == pytest.approx(1.0)
    torch.testing.assert_close(d, get_aggregator("nash_mtl")(jac) / np.sqrt(3))


def test_pcgrad_orders_and_state():
    # m = 2: one projection each, the same in any order (the paper's Figure 1).
    g1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g2 = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    expected = (g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g2 @ g1) / (g1 @ g1) * g1)
    for order in ("random", "index"):
        torch.testing.assert_close(
            get_aggregator("pcgrad", order=order)(torch.stack([g1, g2])), expected
        )
    # Random order: reproducible from the seed, and the generator is saved with the state.
    gen = torch.Generator().manual_seed(3)
    jacs = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(6)]
    first = get_aggregator("pcgrad", seed=5)
    outputs = [first(j) for j in jacs[:3]]
    state = first.state_dict()
    outputs += [first(j) for j in jacs[3:]]
    second = get_aggregator("pcgrad", seed=5)
    assert all(torch.equal(a, second(j)) for a, j in zip(outputs[:3], jacs[:3], strict=True))
    resumed = get_aggregator("pcgrad", seed=99)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed(j)) for a, j in zip(outputs[3:], jacs[3:], strict=True))
    # With m ≥ 3 the order matters: some seed gives another answer.
    jac = torch.tensor([[1.0, 0.0], [-0.6, 1.0], [-0.6, -1.0]], dtype=torch.float64)
    answers = {tuple(get_aggregator("pcgrad", seed=s)(jac).tolist()) for s in range(10)}
    assert len(answers) > 1
    with pytest.raises(ValueError):
        get_aggregator("pcgrad", order="sorted")


# --------------------------------------------------------------------------------------------
# EPO


def _two_quadratics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L_i = ½‖x − c_i‖² with c_1 = (1, 0), c_2 = (0, 1): the Pareto set is the segment."""
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    return 0.5 * ((x - centres) ** 2).sum(dim=1), x - centres


@pytest.mark.parametrize("start", [(0.9, 0.3), (2.0, 2.0)])
def test_epo_reaches_the_preference_ray(start):
    """After many steps, α_1 L_1 ≈ α_2 L_2 on the Pareto segment: the exact Pareto optimum
    x = (1 − t, t) with t / (1 − t) = √(α_2 / α_1). Linear scalarisation with the same α ends
    elsewhere (the control that makes this test able to fail)."""
    alpha = torch.tensor([0.3, 0.7], dtype=torch.float64)
    epo = get_aggregator("epo")
    x = torch.tensor(start, dtype=torch.float64)
    for _ in range(100):
        losses, jac = _two_quadratics(x)
        x = x - 0.2 * epo(jac, losses=losses, preference=alpha)
    losses, _ = _two_quadratics(x)
    weighted = alpha * losses
    assert float(weighted.max() / weighted.min()) < 1.05
    t = np.sqrt(0.7 / 0.3) / (1 + np.sqrt(0.7 / 0.3))
    torch.testing.assert_close(x, torch.tensor([1 - t, t], dtype=torch.float64), atol=1e-2, rtol=0)
    assert epo.last_mode == "descent"

    x = torch.tensor(start, dtype=torch.float64)
    for _ in range(100):
        _, jac = _two_quadratics(x)
        x = x - 0.2 * (alpha @ jac)
    losses, _ = _two_quadratics(x)
    weighted = alpha * losses
    assert float(weighted.max() / weighted.min()) > 2.0


def test_epo_needs_losses_and_preference():
    jac = torch.eye(2, dtype=torch.float64)
    epo = get_aggregator("epo")
    with pytest.raises(ValueError, match="preference"):
        epo(jac, losses=torch.ones(2))
    with pytest.raises(ValueError, match="loss"):
        epo(jac, preference=torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="nonnegative"):
        epo(jac, losses=torch.tensor([1.0, -1.0]), preference=torch.tensor([0.5, 0.5]))
    # Off the ray it balances: the worse-off objective (larger α_i L_i) gets the larger decrease.
    epo(jac, losses=torch.tensor([1.0, 3.0]), preference=torch.tensor([0.5, 0.5]))
    assert epo.last_mode == "balance"
    assert float(epo.last_weights[1]) > float(epo.last_weights[0])


# --------------------------------------------------------------------------------------------
# Agreement with torchjd 0.18 (an independent implementation of the same methods)

HAS_QUADPROG = all(importlib.util.find_spec(m) for m in ("qpsolvers", "quadprog"))
HAS_CVXPY = importlib.util.find_spec("cvxpy") is not None


class _BoundedLeastSquaresProjector:
    """torchjd's dual-cone projector interface, solved by SciPy's BVLS (torchjd's default needs
    quadprog, an extra not installed here): ``min ‖Jᵀv‖ s.t. v ≥ u`` with J from G's factor."""

    def __call__(self, U: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        g = G.double().numpy()
        eigenvalues, eigenvectors = np.linalg.eigh(g)
        factor = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))).T  # factorᵀ factor = G
        rows = []
        for u in U.double().numpy().reshape(-1, g.shape[0]):
            res = lsq_linear(
                factor, np.zeros(g.shape[0]), bounds=(u, np.inf), method="bvls", tol=1e-14
            )
            rows.append(res.x)
        return torch.as_tensor(np.array(rows).reshape(U.shape), dtype=G.dtype)


@SETTINGS
@given(jacobians())
def test_mgda_agrees_with_torchjd(jac):
    """torchjd's Frank-Wolfe stops early (ε = 1e-3, 100 steps), so its point p of the hull is
    only near the min-norm point d. For any p in the hull, ``‖p − d‖² ≤ ‖p‖² − ‖d‖²``: that is
    the agreement to expect, and ours must be at least as short. Two objectives: both exact."""
    gram = jac @ jac.T
    d = get_aggregator("mgda")(jac)
    p = torchjd_aggregation.MGDAWeighting()(gram) @ jac
    tol = 1e-9 * scale_of(jac)
    assert float(d @ d) <= float(p @ p) + tol
    assert float((p - d) @ (p - d)) <= float(p @ p) - float(d @ d) + tol
    if jac.shape[0] == 2:
        torch.testing.assert_close(d, p, atol=1e-7 * float(jac.norm()), rtol=1e-6)


@SETTINGS
@given(jacobians(), st.integers(0, 2**16))
def test_pcgrad_agrees_with_torchjd(jac, seed):
    """Same seed, same permutations: identical up to rounding, for any m."""
    gram = jac @ jac.T
    torch.manual_seed(seed)
    expected = torchjd_aggregation.PCGradWeighting()(gram)
    # torchjd divides by ‖g_j‖² even when it underflows to 0 (a tiny g_j): inf; ours skips it.
    assume(torch.isfinite(expected).all())
    w = get_aggregator("pcgrad", seed=seed).weights(gram)
    torch.testing.assert_close(w, expected, atol=1e-9, rtol=1e-9)


@SETTINGS
@given(jacobians())
def test_imtl_g_agrees_with_torchjd(jac):
    gram = jac @ jac.T
    assume(scale_of(jac) > 1e-6 and np.linalg.cond(gram.numpy()) < 1e8)
    w = get_aggregator("imtl_g").weights(gram)
    expected = torchjd_aggregation.IMTLGWeighting()(gram)
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=1e-6)


@SETTINGS
@given(jacobians(), st.booleans())
def test_upgrad_agrees_with_torchjd(jac, with_preference):
    """torchjd's UPGrad structure (U = diag(p), projections summed) with a BVLS projector."""
    gram = jac @ jac.T
    assume(scale_of(jac) > 1e-6)
    m = jac.shape[0]
    pref = torch.linspace(1.0, 2.0, m, dtype=torch.float64)
    pref = pref / pref.sum() if with_preference else None
    expected = torchjd_aggregation.UPGradWeighting(
        pref_vector=pref, projector=_BoundedLeastSquaresProjector()
    )(gram)
    w = get_aggregator("upgrad").weights(gram, preference=pref)
    torch.testing.assert_close(w @ jac, expected @ jac, atol=1e-6 * float(jac.norm()), rtol=1e-6)


@pytest.mark.skipif(not HAS_QUADPROG, reason="torchjd's default projector needs quadprog")
@SETTINGS
@given(jacobians())
def test_upgrad_agrees_with_torchjd_default_projector(jac):
    """torchjd's own QP (quadprog) on the unit-trace Gram plus 1e-4·I, its regularisation: ours
    on that same matrix gives the same (unique) weights."""
    gram = jac @ jac.T
    assume(scale_of(jac) > 1e-6)
    regularised = gram / gram.trace() + 1e-4 * torch.eye(jac.shape[0], dtype=gram.dtype)
    w = get_aggregator("upgrad").weights(regularised)
    expected = torchjd_aggregation.UPGradWeighting()(gram)
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not HAS_CVXPY, reason="torchjd's CAGrad and Nash-MTL need cvxpy")
@SETTINGS
@given(jacobians(min_m=2), st.sampled_from([0.2, 0.5, 0.9]))
def test_cagrad_agrees_with_torchjd(jac, c):
    """torchjd solves the same problem with cvxpy (Clarabel); no rescaling there. Independent
    gradients only: with zero in the hull both return a direction of rounding noise."""
    gram = jac @ jac.T
    assume(scale_of(jac) > 1e-6 and np.linalg.cond(gram.numpy()) < 1e6)
    w = get_aggregator("cagrad", c=c, rescale=False).weights(gram)
    expected = torchjd_aggregation.CAGradWeighting(c=c, norm_eps=1e-12)(gram)
    torch.testing.assert_close(w @ jac, expected @ jac, atol=1e-3 * float(jac.norm()), rtol=1e-3)


@pytest.mark.skipif(not HAS_CVXPY, reason="torchjd's CAGrad and Nash-MTL need cvxpy")
def test_nash_mtl_agrees_with_torchjd():
    """torchjd's Nash-MTL (a sequence of cvxpy problems, stopped at ‖Gα − 1/α‖ < 1e-3) fails
    on some inputs and then returns its start, all ones: compare where it converged."""
    gen = torch.Generator().manual_seed(0)
    compared = 0
    for _ in range(20):
        m = int(torch.randint(2, 6, (), generator=gen))
        jac = torch.randn(m, m + 3, generator=gen, dtype=torch.float64)
        gram = jac @ jac.T
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = torchjd_aggregation.NashMTL(
                n_tasks=m, max_norm=0.0, optim_niter=100
            ).weighting(jac)
        if float((gram @ expected - 1 / expected).norm()) > 1e-3:
            continue
        compared += 1
        w = get_aggregator("nash_mtl").weights(gram)
        torch.testing.assert_close(w, expected, atol=1e-3, rtol=1e-3)
    assert compared >= 10


# --------------------------------------------------------------------------------------------
# DualProj, Aligned-MTL, ConFIG, GradVac, FairGrad (issue 15): agreement with torchjd 0.18


@SETTINGS
@given(jacobians(), st.booleans())
def test_dualproj_agrees_with_torchjd(jac, with_preference):
    """torchjd's DualProj (project the p-weighted mean once) with an exact BVLS projector.
    Entries either 0 or within 1e3 of the largest: a 1e-8 entry beside 1 makes a cone so thin
    that both solvers' tolerances (~1e-9 of a violation) admit answers far apart."""
    gram = jac @ jac.T
    assume(scale_of(jac) > 1e-6)
    entries = jac.abs()
    assume(bool(((entries == 0) | (entries >= 1e-3 * float(entries.max()))).all()))
    m = jac.shape[0]
    pref = torch.linspace(1.0, 2.0, m, dtype=torch.float64)
    pref = pref / pref.sum() if with_preference else None
    expected = torchjd_aggregation.DualProjWeighting(
        pref_vector=pref, projector=_BoundedLeastSquaresProjector()
    )(gram)
    w = get_aggregator("dualproj").weights(gram, preference=pref)
    torch.testing.assert_close(w @ jac, expected @ jac, atol=1e-6 * float(jac.norm()), rtol=1e-6)


@pytest.mark.skipif(not HAS_QUADPROG, reason="torchjd's default projector needs quadprog")
@SETTINGS
@given(jacobians())
def test_dualproj_agrees_with_torchjd_default_projector(jac):
    gram = jac @ jac.T
    assume(scale_of(jac) > 1e-6)
    regularised = gram / gram.trace() + 1e-4 * torch.eye(jac.shape[0], dtype=gram.dtype)
    w = get_aggregator("dualproj").weights(regularised)
    expected = torchjd_aggregation.DualProjWeighting()(gram)
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@SETTINGS
@given(jac=jacobians(), with_preference=st.booleans())
def test_aligned_mtl_agrees_with_torchjd(scale_mode, jac, with_preference):
    gram = jac @ jac.T
    assume(scale_of(jac) > 1e-6)
    eigenvalues = np.linalg.eigvalsh(gram.numpy())
    # Away from the rank cut-off (λ_max · m · eps), where rounding could pick either side.
    tol = eigenvalues.max() * jac.shape[0] * np.finfo(np.float64).eps
    assume(not ((eigenvalues > tol / 100) & (eigenvalues < tol * 100)).any())
    m = jac.shape[0]
    pref = torch.linspace(1.0, 2.0, m, dtype=torch.float64)
    pref = pref / pref.sum() if with_preference else None
    expected = torchjd_aggregation.AlignedMTLWeighting(pref_vector=pref, scale_mode=scale_mode)(
        gram
    )
    w = get_aggregator("aligned_mtl", scale_mode=scale_mode).weights(gram, preference=pref)
    torch.testing.assert_close(w @ jac, expected @ jac, atol=1e-6 * float(jac.norm()), rtol=1e-6)


def test_aligned_mtl_aligns_the_principal_components():
    """The balanced Jacobian ``Bᵀ... = Jᵀ B`` has orthogonal columns of equal norm √λ_min on the
    span of independent gradients: ``Bᵀ G B = λ_min I``."""
    gen = torch.Generator().manual_seed(0)
    jac = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    gram = jac @ jac.T
    agg = get_aggregator("aligned_mtl")
    balance = torch.stack([agg.weights(gram, preference=e) for e in torch.eye(3, dtype=gram.dtype)])
    lam_min = float(torch.linalg.eigvalsh(gram).min())
    torch.testing.assert_close(balance @ gram @ balance.T, lam_min * torch.eye(3, dtype=gram.dtype))


@SETTINGS
@given(jacobians(min_m=2), st.booleans())
def test_config_agrees_with_torchjd(jac, with_preference):
    """Well-conditioned unit gradients (where a Gram pseudo-inverse is as good as U's own)."""
    norms = jac.norm(dim=1)
    assume(bool((norms > 1e-3 * float(norms.max())).all()) and float(norms.max()) > 1e-3)
    units = jac / norms[:, None]
    assume(np.linalg.cond((units @ units.T).numpy()) < 1e5)
    m = jac.shape[0]
    pref = torch.linspace(1.0, 2.0, m, dtype=torch.float64) if with_preference else None
    expected = torchjd_aggregation.ConFIG(pref_vector=pref)(jac)
    got = get_aggregator("config")(jac, preference=None if pref is None else pref / pref.sum())
    torch.testing.assert_close(got, expected, atol=1e-6 * float(jac.norm()), rtol=1e-6)
    # Equal cosines with every gradient (p = 1): the conflict-free direction.
    if pref is None and float(got.norm()) > 0:
        cosines = (units @ got) / got.norm()
        torch.testing.assert_close(cosines, cosines.mean().expand_as(cosines))


@SETTINGS
@given(st.integers(2, 5), st.integers(0, 2**16), st.floats(0.0, 1.0))
def test_gradvac_agrees_with_torchjd_over_several_calls(m, seed, beta):
    """Same seed, same visiting orders, the same EMA targets carried from call to call."""
    gen = torch.Generator().manual_seed(seed)
    grams = []
    for _ in range(4):
        jac = torch.randn(m, m + 2, generator=gen, dtype=torch.float64)
        grams.append(jac @ jac.T)
    ours = get_aggregator("gradvac", beta=beta, seed=seed)
    theirs = torchjd_aggregation.GradVacWeighting(beta=beta)
    torch.manual_seed(seed)
    expected = [theirs(g) for g in grams]
    for gram, w_theirs in zip(grams, expected):
        torch.testing.assert_close(ours.weights(gram), w_theirs, atol=1e-9, rtol=1e-9)


def test_gradvac_state_round_trips_and_starts_as_pcgrad():
    gen = torch.Generator().manual_seed(1)
    jacs = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(6)]
    first = get_aggregator("gradvac", seed=2)
    for jac in jacs[:3]:
        first(jac)
    state = copy.deepcopy(first.state_dict())  # as torch.save would (buffers are live views)
    assert state["targets"].shape == (3, 3) and "_extra_state" in state
    expected = [first(jac) for jac in jacs[3:]]
    resumed = get_aggregator("gradvac", seed=99)  # the generator state comes from the dict
    resumed.load_state_dict(state)
    for jac, d in zip(jacs[3:], expected):
        assert torch.equal(resumed(jac), d)
    # Zero targets (the first call): PCGrad's surgery of the conflicting pairs, m = 2.
    pair = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(
        get_aggregator("gradvac", eps=0.0)(pair), get_aggregator("pcgrad")(pair)
    )


def _fairgrad_residual(gram: torch.Tensor, w: torch.Tensor, alpha: float) -> float:
    return float((gram @ w - w ** (-1.0 / alpha)).abs().max())


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_solves_its_equation_and_agrees_with_torchjd(alpha):
    gen = torch.Generator().manual_seed(0)
    compared = 0
    for _ in range(20):
        m = int(torch.randint(2, 6, (), generator=gen))
        jac = torch.randn(m, m + 3, generator=gen, dtype=torch.float64)
        gram = jac @ jac.T
        w = get_aggregator("fairgrad", alpha=alpha).weights(gram)
        assert (w > 0).all()
        assert _fairgrad_residual(gram, w, alpha) <= 1e-7 * float((w ** (-1 / alpha)).max())
        expected = torchjd_aggregation.FairGradWeighting(alpha=alpha)(gram)
        if _fairgrad_residual(gram, expected, alpha) > 1e-6:
            continue  # SciPy's least_squares stopped early
        compared += 1
        torch.testing.assert_close(w, expected, atol=1e-5, rtol=1e-5)
    assert compared >= 10
    torch.testing.assert_close(
        get_aggregator("fairgrad", alpha=0.0).weights(gram),
        torch.full((m,), 1.0 / m, dtype=torch.float64),
    )


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_fairgrad_scaling_and_its_nash_mtl_case(alpha):
    """J → cJ scales d by c^((1−α)/(1+α)); at α = 1 the equation is Nash-MTL's."""
    gen = torch.Generator().manual_seed(3)
    jac = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    fair = get_aggregator("fairgrad", alpha=alpha)
    d = fair(jac)
    for c in (1e-2, 7.0):
        torch.testing.assert_close(fair(c * jac), c ** ((1 - alpha) / (1 + alpha)) * d)
    if alpha == 1.0:
        torch.testing.assert_close(d, get_aggregator("nash_mtl")(jac), atol=1e-8, rtol=1e-8)
