"""Merge methods on plain tensors: the properties that define each formula (SLERP and its
multi-model form, model stock, DELLA, breadcrumbs), each written so that a wrong formula fails."""

from __future__ import annotations

import math

import pytest
import torch

from align.merging import available_merge_methods, get_merge_method
from align.merging.methods.breadcrumbs import breadcrumbs_counts
from align.merging.methods.della import magnitude_keep_probabilities, magprune_
from align.merging.methods.model_stock import model_stock_ratio
from align.merging.methods.slerp import multislerp, slerp

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _unit(*values: float) -> torch.Tensor:
    v = torch.tensor(values, dtype=torch.float64)
    return v / v.norm()


def _w(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_new_methods_are_registered():
    names = available_merge_methods()
    for name in (
        "slerp",
        "multislerp",
        "multislerp_task",
        "model_stock",
        "della",
        "della_linear",
        "breadcrumbs",
        "breadcrumbs_ties",
    ):
        assert name in names, name


# --- SLERP ---------------------------------------------------------------------------------------


def test_slerp_endpoints_norm_and_angle():
    method = get_merge_method("slerp")
    a, b = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stacked = torch.stack([a, b])
    torch.testing.assert_close(method.merge("w", stacked, None, _w(1, 0)), a)
    torch.testing.assert_close(method.merge("w", stacked, None, _w(0, 1)), b)
    u, v = _unit(1, 2, 0, -1), _unit(0, 1, 3, 1)
    omega = math.acos(float(u @ v))
    for t in (0.1, 0.25, 0.5, 0.8):
        point = method.merge("w", torch.stack([u, v]), None, _w(1 - t, t))
        assert float(point.norm()) == pytest.approx(1.0, abs=1e-12)  # stays on the sphere
        assert math.acos(float(point @ u)) == pytest.approx(t * omega, abs=1e-9)  # uniform speed
        linear = (1 - t) * u + t * v
        assert float((point - linear).norm()) > 1e-3  # not the chord


def test_slerp_of_parallel_vectors_is_linear_and_needs_two_models():
    v = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    for t in (0.3, 0.7):
        torch.testing.assert_close(slerp(t, v, 3 * v), (1 - t) * v + t * 3 * v)
    with pytest.raises(ValueError, match="multislerp"):
        get_merge_method("slerp").merge("w", torch.zeros(3, 4), None, torch.ones(3) / 3)


def test_multislerp_two_models_is_slerp_and_vertices_return_the_model():
    u, v = _unit(1, 0, 2), _unit(-1, 2, 1)
    for t in (0.2, 0.5, 0.9):
        torch.testing.assert_close(multislerp(_w(1 - t, t), torch.stack([u, v])), slerp(t, u, v))
    # Norm: the α-weighted mean of the norms; direction as for unit vectors.
    a, b = 2 * u, 5 * v
    point = multislerp(_w(0.5, 0.5), torch.stack([a, b]))
    assert float(point.norm()) == pytest.approx(3.5)
    torch.testing.assert_close(point / point.norm(), slerp(0.5, u, v))
    models = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(multislerp(_w(0, 1, 0), models), models[1])
    # Three unit vectors: the result is a unit vector, and the order of the models is irrelevant.
    units = torch.stack([_unit(1, 0, 0, 1), _unit(0, 1, 0, 1), _unit(1, 1, 1, 0)])
    alpha = _w(0.2, 0.3, 0.5)
    point = multislerp(alpha, units)
    assert float(point.norm()) == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(multislerp(alpha[[2, 0, 1]], units[[2, 0, 1]]), point)
    # On task vectors: base + the spherical mean of θ_k − θ_base.
    base = torch.full((4,), 0.5, dtype=torch.float64)
    method = get_merge_method("multislerp_task")
    merged = method.merge("w", units + base, base, alpha)
    torch.testing.assert_close(merged, base + point)


# --- model stock ---------------------------------------------------------------------------------


def test_model_stock_ratio_follows_the_papers_formula():
    base = torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64)
    for cos in (0.9, 0.5, 0.1):
        sin = math.sqrt(1 - cos**2)
        tau = torch.tensor([[2.0, 0, 0], [3 * cos, 3 * sin, 0]], dtype=torch.float64)
        t = 2 * cos / (1 + cos)  # K = 2
        assert float(model_stock_ratio(tau)) == pytest.approx(t)
        models = tau + base
        merged = get_merge_method("model_stock").merge("w", models, base, _w(0.5, 0.5))
        torch.testing.assert_close(merged, t * models.mean(0) + (1 - t) * base)
    # K = 3: the mean of the three pairwise cosines, t = 3c / (1 + 2c).
    tau = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0]], dtype=torch.float64)
    c = (0 + 2 * (1 / math.sqrt(2))) / 3
    assert float(model_stock_ratio(tau)) == pytest.approx(3 * c / (1 + 2 * c))
    # Filter-wise: one ratio per row of a matrix.
    rows = torch.tensor([[[1.0, 0], [1.0, 0]], [[1.0, 0], [0, 1.0]]], dtype=torch.float64)
    ratio = model_stock_ratio(rows, filter_wise=True)
    assert ratio.shape == (2, 1)
    torch.testing.assert_close(ratio[:, 0], _w(1.0, 0.0))  # parallel rows: t = 1, orthogonal: 0


# --- breadcrumbs ---------------------------------------------------------------------------------


def test_breadcrumbs_removes_the_largest_and_smallest_at_the_stated_fractions():
    generator = torch.Generator().manual_seed(0)
    magnitudes = torch.randperm(200, generator=generator).double() + 1  # 1 … 200, shuffled
    signs = torch.where(torch.rand(200, generator=generator) < 0.5, -1.0, 1.0).double()
    tau = (magnitudes * signs).reshape(10, 20)
    base = torch.zeros(10, 20, dtype=torch.float64)
    density, gamma = 0.8, 0.05
    assert breadcrumbs_counts(200, density, gamma) == (10, 30)
    method = get_merge_method("breadcrumbs", density=density, gamma=gamma)
    merged = method.merge("w", torch.stack([tau, tau]), base, _w(0.5, 0.5))
    kept = merged != 0
    assert int(kept.sum()) == 160
    assert set(magnitudes.reshape(10, 20)[kept].tolist()) == set(range(31, 191))  # 30 low, 10 high
    torch.testing.assert_close(merged[kept], tau[kept])
    with pytest.raises(ValueError, match="density \\+ gamma"):
        get_merge_method("breadcrumbs", density=0.9, gamma=0.2)
    # The TIES form elects signs among the kept entries.
    ties = get_merge_method("breadcrumbs_ties", density=density, gamma=gamma)
    opposite = ties.merge("w", torch.stack([tau, -tau]), base, _w(0.7, 0.3))
    torch.testing.assert_close(opposite[kept], 0.7 * tau[kept])


# --- DELLA ---------------------------------------------------------------------------------------


def test_della_keep_probabilities_are_ranked_by_magnitude():
    row = torch.tensor([[0.5, -3.0, 0.1, 2.0, -1.0]], dtype=torch.float64)
    p = magnitude_keep_probabilities(row, density=0.5, epsilon=0.2)
    # ranks by |τ|: 0.1 → 0, 0.5 → 1, 1.0 → 2, 2.0 → 3, 3.0 → 4; p = 0.3 + 0.4 · rank / 4
    torch.testing.assert_close(p, torch.tensor([[0.4, 0.7, 0.3, 0.6, 0.5]], dtype=torch.float64))
    assert float(p.mean()) == pytest.approx(0.5)
    assert torch.equal(magnitude_keep_probabilities(row, 0.5, 0.0), torch.full_like(row, 0.5))
    with pytest.raises(ValueError, match="epsilon"):
        get_merge_method("della", density=0.5, epsilon=0.6)


def test_della_drop_rates_and_rescale_keep_the_expectation():
    tau = torch.tensor([[0.5, -3.0, 0.1, 2.0, -1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    p = magnitude_keep_probabilities(tau, 0.5, 0.2)
    draws = torch.stack([magprune_(tau.clone(), 0.5, 0.2, seed) for seed in range(4000)])
    kept = (draws != 0).double().mean(0)
    torch.testing.assert_close(kept, p.double(), atol=0.03, rtol=0)  # drop rate 1 − p per entry
    survivors = draws[0][draws[0] != 0]
    torch.testing.assert_close(survivors, (tau / p)[draws[0] != 0])  # rescaled by 1 / p_i
    torch.testing.assert_close(draws.mean(0), tau, atol=0.1 * float(tau.abs().max()), rtol=0)
    # della_linear at a vertex: the base plus that model's pruned task vector.
    base = torch.zeros_like(tau)
    method = get_merge_method("della_linear", density=0.5, epsilon=0.2, seed=3)
    merged = method.merge("w", torch.stack([tau, -tau]), base, torch.tensor([1.0, 0.0]))
    assert 0 < int((merged != 0).sum()) < tau.numel()
    assert torch.all((merged == 0) | torch.isclose(merged, tau / p))
