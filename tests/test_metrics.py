import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from align.metrics import (
    dominates,
    hypervolume,
    mip,
    normalize_scores,
    pareto_front,
    pareto_mask,
    plot_fronts,
    spacing,
)


def brute_force_mask(points, maximize):
    signed = np.where(maximize, points, -points)
    keep = []
    for i, p in enumerate(signed):
        dominated = any(np.all(q >= p) and np.any(q > p) for j, q in enumerate(signed) if j != i)
        keep.append(not dominated)
    return np.array(keep, dtype=bool)


@settings(deadline=None, max_examples=50)
@given(st.integers(1, 40), st.integers(2, 4), st.integers(0, 10_000), st.booleans())
def test_pareto_mask_matches_brute_force(n, m, seed, integer_grid):
    rng = np.random.default_rng(seed)
    # Integer grids create ties and duplicates, the hard cases for dominance.
    points = rng.integers(0, 4, (n, m)).astype(float) if integer_grid else rng.normal(size=(n, m))
    maximize = rng.random(m) < 0.5
    assert np.array_equal(pareto_mask(points, maximize), brute_force_mask(points, maximize))


def test_pareto_front_is_sorted_unique_and_non_dominated():
    points = np.array([[1, 5], [2, 4], [2, 4], [0, 0], [3, 1], [1.5, 3.0]])
    front = pareto_front(points)
    assert front.tolist() == [[1, 5], [2, 4], [3, 1]]
    assert pareto_front(points, maximize=False).tolist() == [[0, 0]]


def exact_hv_2d(points, ref):
    """Independent 2-D hypervolume (maximisation) by a sweep over the sorted front."""
    points = points[np.all(points > ref, axis=1)]
    front = points[brute_force_mask(points, np.array([True, True]))]
    front = np.unique(front, axis=0)
    front = front[np.argsort(-front[:, 0])]
    area, best_y = 0.0, ref[1]
    for x, y in front:
        if y > best_y:
            area += (x - ref[0]) * (y - best_y)
            best_y = y
    return area


@settings(deadline=None, max_examples=50)
@given(st.integers(1, 30), st.integers(0, 10_000))
def test_hypervolume_2d_matches_exact_sweep(n, seed):
    rng = np.random.default_rng(seed)
    points = rng.random((n, 2))
    ref = np.array([0.1, 0.05])
    assert hypervolume(points, ref) == pytest.approx(exact_hv_2d(points, ref), rel=1e-10, abs=1e-12)


@settings(deadline=None, max_examples=30)
@given(st.integers(1, 25), st.integers(2, 4), st.integers(0, 10_000))
def test_hypervolume_matches_pymoo(n, m, seed):
    from pymoo.indicators.hv import HV

    rng = np.random.default_rng(seed)
    points = rng.random((n, m))
    ref = np.full(m, 1.1)
    # pymoo minimises; compare minimisation directly and maximisation through negation.
    expected = HV(ref_point=ref)(points)
    assert hypervolume(points, ref, maximize=False) == pytest.approx(expected, rel=1e-9)
    assert hypervolume(-points, -ref, maximize=True) == pytest.approx(expected, rel=1e-9)


def test_hypervolume_ignores_dominated_points_and_checks_the_reference():
    front = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    base = hypervolume(front, [0, 0])
    assert base == pytest.approx(6.0)
    # A point below the reference in one objective adds nothing.
    assert hypervolume(np.vstack([front, [[-5.0, 10.0]]]), [0, 0]) == pytest.approx(base)
    assert hypervolume(np.vstack([front, [[1.0, 1.0]]]), [0, 0]) == pytest.approx(base)
    with pytest.raises(ValueError, match="reference point"):
        hypervolume(front, [0, 0, 0])
    with pytest.raises(ValueError, match="non-finite"):
        hypervolume([[np.nan, 1.0]], [0, 0])


def test_mip_rewards_moving_where_alpha_points():
    alphas = np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    aligned = np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    anti = aligned[::-1]
    assert mip(alphas, aligned) == pytest.approx((1 + 0.5 + 1) / 3)
    assert mip(alphas, aligned) > mip(alphas, anti)


@given(st.integers(0, 10_000))
def test_mip_is_invariant_to_positive_affine_rescaling_of_each_objective(seed):
    rng = np.random.default_rng(seed)
    alphas = rng.dirichlet([1, 1, 1], size=7)
    scores = rng.normal(size=(7, 3))
    scale, shift = rng.uniform(0.1, 10, 3), rng.normal(size=3)
    assert mip(alphas, scores * scale + shift) == pytest.approx(mip(alphas, scores))


def test_normalize_scores_handles_constant_objectives_and_bounds():
    scores = np.array([[1.0, 5.0], [3.0, 5.0]])
    assert normalize_scores(scores).tolist() == [[0.0, 0.5], [1.0, 0.5]]
    assert normalize_scores(scores, lower=[0, 0], upper=[4, 10]).tolist() == [
        [0.25, 0.5],
        [0.75, 0.5],
    ]
    with pytest.raises(ValueError, match="same"):
        mip(np.ones((2, 2)) / 2, np.ones((3, 2)))


def test_spacing():
    even = np.array([[0, 3], [1, 2], [2, 1], [3, 0]], dtype=float)
    assert spacing(even) == pytest.approx(0.0)
    uneven = np.array([[0, 3], [0.1, 2.9], [2, 1], [3, 0]], dtype=float)
    assert spacing(uneven) > 0.1
    assert np.isnan(spacing([[1.0, 2.0]]))


def test_plot_fronts_writes_a_png(tmp_path):
    import matplotlib.image

    rng = np.random.default_rng(0)
    path = plot_fronts(
        {"route A": rng.random((11, 2)), "route B": rng.random((11, 2))},
        tmp_path / "front.png",
        objectives=("positivity", "brevity"),
        labels={"route A": [f"{a / 10:.1f}" for a in range(11)]},
        title="test",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).shape[:2] == (600, 720)
    three = plot_fronts(
        {"x": rng.random((5, 3))}, tmp_path / "three.png", objectives=("a", "b", "c")
    )
    assert matplotlib.image.imread(three).shape[1] == 3 * 720
    with pytest.raises(ValueError, match="expected 2"):
        plot_fronts({"x": rng.random((5, 3))}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


@settings(deadline=None, max_examples=50)
@given(st.integers(1, 20), st.integers(2, 4), st.integers(0, 10_000))
def test_a_set_dominates_a_point_exactly_when_the_point_is_off_their_joint_front(n, m, seed):
    rng = np.random.default_rng(seed)
    points = rng.integers(0, 4, (n, m)).astype(float)  # ties and duplicates
    point = rng.integers(0, 4, m).astype(float)
    maximize = rng.random(m) < 0.5
    joint = np.vstack([points, point])
    expected = not brute_force_mask(joint, maximize)[-1]
    assert dominates(points, point, maximize) is expected
    # Order does not matter, and a point never dominates itself.
    assert dominates(points[rng.permutation(n)], point, maximize) is expected
    assert not dominates(point[None], point, maximize)


def test_dominates_is_strict_and_checks_shapes():
    assert dominates([[0.72, 0.0], [0.32, 0.47]], [0.41, 0.0])
    assert not dominates([[0.72, 0.0], [0.32, 0.47]], [0.41, 0.001])  # better on one only
    with pytest.raises(ValueError, match="objectives"):
        dominates([[1.0, 2.0]], [1.0, 2.0, 3.0])
