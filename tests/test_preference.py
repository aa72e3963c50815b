import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from align.preference import Preference, require_same_objectives, sample_preferences, simplex_grid

NAMES = ("helpful", "harmless", "brief")
finite = st.floats(min_value=0, max_value=10, allow_nan=False, allow_infinity=False)


def simplex_points(m):
    return arrays(np.float64, m, elements=st.floats(0.01, 1.0)).map(lambda v: v / v.sum())


@given(simplex_points(3))
def test_valid_vector_is_accepted_and_kept_exactly(weights):
    preference = Preference(weights, NAMES)
    assert preference.objectives == NAMES
    assert torch.equal(preference.weights, torch.from_numpy(weights))
    assert Preference.coerce(preference.to_dict(), NAMES) == preference


@given(simplex_points(3), st.integers(0, 2), st.floats(1e-4, 5))
def test_negative_weight_is_rejected_naming_the_value(weights, index, amount):
    weights = weights.copy()
    weights[index] = -amount
    weights[(index + 1) % 3] += 1 - weights.sum()  # keep the sum at 1: only the sign is wrong
    with pytest.raises(ValueError, match="negative") as error:
        Preference(weights, NAMES)
    assert f"{-amount:.6g}" in str(error.value)


@given(simplex_points(3), st.floats(1e-5, 10).flatmap(lambda x: st.sampled_from([x, -x])))
def test_sum_off_by_more_than_tolerance_is_rejected(weights, offset):
    weights = weights.copy()
    weights[0] = weights[0] + offset
    if weights[0] < 0:
        weights[0] = 0
        if abs(weights.sum() - 1) <= 1e-6:
            return
    with pytest.raises(ValueError, match="sums to"):
        Preference(weights, NAMES)


@given(simplex_points(2), st.floats(-9e-7, 9e-7))
def test_sum_within_tolerance_is_accepted_without_renormalising(weights, offset):
    weights = weights.copy()
    weights[1] += offset
    if weights[1] < 0:
        return
    assert torch.equal(Preference(weights, NAMES[:2]).weights, torch.from_numpy(weights))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_rejected(bad):
    with pytest.raises(ValueError, match="non-finite"):
        Preference([bad, 0.5], ("a", "b"))


@given(st.integers(1, 6).filter(lambda n: n != 3))
def test_wrong_length_is_rejected(length):
    with pytest.raises(ValueError, match="needs 3 weights"):
        Preference(np.full(length, 1.0 / length), NAMES)


def test_batch_error_names_the_row():
    batch = [[0.5, 0.5], [0.7, 0.4], [1.0, 0.0]]
    with pytest.raises(ValueError, match=r"row 1"):
        Preference(batch, ("a", "b"))


def test_batch_rows_and_expand():
    batch = Preference(simplex_grid(2), ("a", "b"))
    assert batch.is_batched and len(batch) == 11
    assert batch[3].to_dict() == pytest.approx({"a": 0.3, "b": 0.7})
    single = Preference([0.25, 0.75], ("a", "b"))
    assert single.expand(4).weights.shape == (4, 2)
    with pytest.raises(ValueError, match="11 rows"):
        batch.expand(4)


def test_dict_must_name_exactly_the_objectives():
    with pytest.raises(ValueError, match=r"missing \['brief'\]"):
        Preference.coerce({"helpful": 0.5, "harmless": 0.5}, NAMES)
    with pytest.raises(ValueError, match=r"unknown \['funny'\]"):
        Preference.coerce({"helpful": 0.5, "harmless": 0.5, "brief": 0.0, "funny": 0.0}, NAMES)


def test_coerce_reorders_by_name_and_refuses_other_objectives():
    ours = Preference([0.7, 0.3], ("helpful", "harmless"))
    flipped = Preference.coerce(ours, ("harmless", "helpful"))
    assert flipped.to_dict() == ours.to_dict()
    assert flipped.objectives == ("harmless", "helpful")
    with pytest.raises(ValueError, match=r"\('helpful', 'brief'\).*\('helpful', 'harmless'\)"):
        Preference.coerce(ours, ("helpful", "brief"))


def test_require_same_objectives_names_both_lists():
    with pytest.raises(ValueError, match=r"adapter has \('a', 'b'\), dataset has \('b', 'a'\)"):
        require_same_objectives(("a", "b"), ("b", "a"), "adapter", "dataset")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("helpful=0.7,harmless=0.3", [0.7, 0.3]),
        ("harmless=0.3, helpful=0.7", [0.7, 0.3]),
        ("0.2,0.8", [0.2, 0.8]),
    ],
)
def test_parse(text, expected):
    assert Preference.parse(text, ("helpful", "harmless")).weights.tolist() == pytest.approx(
        expected
    )


@pytest.mark.parametrize("text", ["helpful=lots,harmless=0", "a,b", "helpful=0.5,helpful=0.5"])
def test_parse_errors_name_the_text(text):
    with pytest.raises(ValueError, match="preference"):
        Preference.parse(text, ("helpful", "harmless"))


def test_objective_names_are_validated():
    for bad in [(), ("a", "a"), ("a", ""), "ab"]:
        with pytest.raises(ValueError):
            Preference([1.0], bad)


def test_simplex_grid_two_objectives_is_the_eleven_point_protocol():
    grid = simplex_grid(2, 10)
    expected = torch.tensor([[i / 10, 1 - i / 10] for i in range(11)], dtype=torch.float64)
    assert torch.allclose(grid, expected, atol=1e-12)


@settings(deadline=None)
@given(st.integers(1, 5), st.integers(1, 12))
def test_simplex_grid_properties(m, n):
    grid = simplex_grid(m, n)
    assert grid.shape == (math.comb(n + m - 1, m - 1), m)
    assert torch.all(grid >= 0)
    assert torch.allclose(grid.sum(1), torch.ones(grid.shape[0], dtype=torch.float64))
    assert torch.allclose(grid * n, torch.round(grid * n))
    assert len({tuple(row) for row in grid.tolist()}) == grid.shape[0]
    Preference(grid, [f"o{i}" for i in range(m)])  # every row is a valid α


@settings(deadline=None)
@given(st.integers(1, 6), st.floats(0.05, 5), st.integers(0, 2**32 - 1))
def test_dirichlet_samples_are_valid_and_reproducible(m, concentration, seed):
    draws = sample_preferences(m, 16, concentration, generator=seed)
    assert draws.shape == (16, m)
    Preference(draws, [f"o{i}" for i in range(m)])
    assert torch.equal(draws, sample_preferences(m, 16, concentration, generator=seed))
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    assert torch.equal(
        sample_preferences(m, 4, generator=g1), sample_preferences(m, 4, generator=g2)
    )


@pytest.mark.parametrize("concentration", [0.5, 1.0, 2.0])
def test_dirichlet_concentration_sets_the_spread(concentration):
    # For m = 2 the first weight is Beta(p, p): variance 1 / (4 (2p + 1)); p = 0.5 favours corners.
    draws = sample_preferences(2, 40_000, concentration, generator=0)
    assert draws[:, 0].var().item() == pytest.approx(1 / (4 * (2 * concentration + 1)), rel=0.05)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_dirichlet_rejects_bad_concentration(bad):
    with pytest.raises(ValueError, match="concentration"):
        sample_preferences(2, concentration=bad)
