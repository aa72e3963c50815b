"""ML2O / GML2O (align.mograd.learned): shapes, scale-freeness, state round trips, the guard,
the engine, the shipped weights."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from align.mograd import available_aggregators, get_aggregator
from align.mograd.engine import MultiObjectiveEngine
from align.mograd.learned.gml2o import GML2O, accepts
from align.mograd.learned.ml2o import (
    ML2O,
    default_weights_path,
    load_network,
    network_info,
    save_network,
)
from align.mograd.learned.network import ML2ONet, encode, network_inputs
from lab.meta_training.meta import MetaConfig, meta_train, progress
from lab.meta_training.problems import Quadratic

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


def jacobian(m: int, p: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Objectives of very different scales, partly conflicting.
    scales = torch.logspace(-3, 2, m)
    return torch.randn(m, p, generator=g) * scales.unsqueeze(1)


def aligned_jacobians(count: int, m: int, p: int, seed: int = 0) -> list[torch.Tensor]:
    """Partly aligned gradients of one scale, on which the shipped GML2O takes its learned
    steps (on :func:`jacobian`'s, 10⁵ apart in scale, it falls back to MGDA)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(p, generator=g)
    return [shared + 0.5 * torch.randn(m, p, generator=g) for _ in range(count)]


def mgda_direction(j: torch.Tensor) -> torch.Tensor:
    return get_aggregator("mgda")(j.double()).float()


def with_gains(a: float, b: float = 0.0) -> ML2ONet:
    """A network whose output is exactly ``a · d* + b · ḡ`` (zero head)."""
    net = ML2ONet()
    with torch.no_grad():
        net.gains.copy_(torch.tensor([a, b]))
    return net


# --- registry and shapes -------------------------------------------------------------------


def test_registered_as_update_level_methods():
    kinds = available_aggregators()
    assert kinds["ml2o"] == "update" and kinds["gml2o"] == "update"
    assert isinstance(get_aggregator("ml2o"), ML2O)
    assert isinstance(get_aggregator("GML2O", margin=0.25), GML2O)
    instance = GML2O(weights=None)
    assert get_aggregator(instance) is instance
    with pytest.raises(ValueError, match="margin must be > 0"):
        get_aggregator("gml2o", margin=-1)
    with pytest.raises(ValueError, match="bad options"):
        get_aggregator("ml2o", no_such_option=1)


@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("p", [1, 7, 300])
def test_update_shapes_and_finiteness_for_any_m_and_p(m, p):
    j = jacobian(m, p, seed=m * 100 + p)
    for method in (ML2O(), GML2O()):
        for _ in range(3):
            d = method(j)
            assert d.shape == (p,) and d.dtype == j.dtype and torch.isfinite(d).all()
        assert method.hidden.shape == (p, method.net.state_size(m))
        assert method.last_weights.shape == (m,)
        assert int(method.steps) == 3


def test_bad_inputs_are_refused():
    method = ML2O()
    with pytest.raises(ValueError, match=r"shape \(m, P\)"):
        method(torch.zeros(5))
    with pytest.raises(ValueError, match="non-finite"):
        method(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="state_dtype"):
        ML2O(state_dtype="int8")
    untied = ML2ONet(tie_specific=False, num_objectives=2)
    with pytest.raises(ValueError, match="cannot take 3 objectives"):
        ML2O(net=untied)(jacobian(3, 4))
    assert ML2O(net=untied)(jacobian(2, 4)).shape == (4,)


def test_untrained_network_is_exactly_mgda():
    j = jacobian(3, 50)
    assert torch.allclose(ML2O(weights=None)(j), mgda_direction(j), rtol=1e-5, atol=1e-7)


def test_chunking_does_not_change_the_update():
    j = jacobian(2, 1000, seed=3)
    whole, chunked = ML2O(chunk_size=10**6), ML2O(chunk_size=97)
    for _ in range(3):
        torch.testing.assert_close(whole(j), chunked(j))


# --- scale-freeness ------------------------------------------------------------------------


def _reference_lstm(cell: nn.LSTMCell, x, h, c):
    """An LSTM cell written out (gates i, f, g, o)."""
    gates = x @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _reference_step(net: ML2ONet, u, mgda, mean, state):
    """:meth:`ML2ONet.step` written out per objective and per coordinate row."""
    m, n = u.shape
    hs, hh = net.specific_hidden, net.shared_hidden
    state = state.float()
    hs_new, cs_new = [], []
    for i in range(m):
        cell = net.specific[0 if net.tie_specific else i]
        h = state[:, i * hs : (i + 1) * hs]
        c = state[:, m * hs + i * hs : m * hs + (i + 1) * hs]
        h, c = _reference_lstm(cell, encode(u[i]), h, c)
        hs_new.append(h)
        cs_new.append(c)
    pooled = torch.stack(hs_new)
    shared_in = torch.cat([pooled.mean(0), pooled.amax(0), encode(mgda), encode(mean)], dim=1)
    h_sh, c_sh = _reference_lstm(
        net.shared, shared_in, state[:, 2 * m * hs : 2 * m * hs + hh], state[:, 2 * m * hs + hh :]
    )
    out = net.gains[0] * mgda + net.gains[1] * mean + (h_sh @ net.head.weight.T).squeeze(1)
    return out + net.head.bias, torch.cat([*hs_new, *cs_new, h_sh, c_sh], dim=1)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("m", [2, 3])
@torch.no_grad()
def test_the_inference_path_equals_a_plain_lstm_written_out(tie, m):
    """ML2O runs the network through :meth:`ML2ONet.runner` (gates fused into one matmul,
    tanh as 2σ(2z) − 1, feature-major buffers): the same numbers, to float32 rounding, as a
    per-objective LSTM written out, and as :meth:`ML2ONet.step`; fresh or carried state, a
    row-major or feature-major state, a last chunk smaller than the buffers."""
    torch.manual_seed(m + 10 * tie)
    net = ML2ONet(tie_specific=tie, num_objectives=None if tie else m)
    for parameter in net.parameters():
        parameter.normal_(0.0, 0.5)
    runner = net.runner(m, 64)
    n = 50
    state = torch.zeros(n, net.state_size(m))
    for step in range(3):
        inputs = network_inputs(jacobian(m, n, seed=step))
        u, mgda, mean = inputs["u"], inputs["mgda"], inputs["mean"]
        expected, expected_state = _reference_step(net, u, mgda, mean, state)
        stepped, stepped_state = net.step(u, mgda, mean, state)
        for layout in ("rows", "features"):
            new_state = (
                torch.empty_like(state) if layout == "rows" else torch.empty(state.shape[1], n).t()
            )
            given = None if step == 0 and layout == "rows" else state.clone()
            out = runner.step(u, mgda, mean, given, new_state)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(new_state, expected_state, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out, stepped, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(new_state, stepped_state, rtol=1e-5, atol=1e-6)
        state = expected_state


def test_a_row_major_state_from_an_older_checkpoint_loads_and_resumes():
    """The state is kept feature-major (``hidden`` is the transpose of a contiguous tensor); a
    row-major ``hidden`` (as saved before) loads into it and gives the same next update."""
    js = aligned_jacobians(3, 2, 40)
    original = GML2O(state_dtype="float32")
    for j in js[:2]:
        original(j)
    assert original.hidden.stride() == (1, original.hidden.shape[0])
    saved = {k: v.clone() for k, v in original.state_dict().items()}
    saved["hidden"] = saved["hidden"].contiguous()  # the old layout
    restored = GML2O(state_dtype="float32")
    restored.load_state_dict(saved)
    assert restored.hidden.stride() == (1, restored.hidden.shape[0])
    torch.testing.assert_close(restored(js[2]), original(js[2]), rtol=0, atol=0)


def test_preprocessing_is_invariant_to_each_objectives_scale():
    j = jacobian(3, 200)
    scaled = j * torch.tensor([[1e-4], [3.0], [250.0]])
    torch.testing.assert_close(network_inputs(scaled)["u"], network_inputs(j)["u"])
    # The encoding itself: continuous at the threshold, bounded.
    v = torch.tensor([0.0, math.exp(-10) * 0.999, math.exp(-10) * 1.001, -1e3, 1e3])
    features = encode(v)
    assert features.abs().max() <= 1.0
    assert torch.allclose(features[1], features[2], atol=1e-2)


def test_update_is_homogeneous_in_the_gradients():
    """Scaling every gradient by c scales the update by c (fresh states, trained weights)."""
    j = jacobian(2, 300, seed=5)
    for c in (1e-3, 7.0):
        a, b = ML2O(state_dtype="float32"), ML2O(state_dtype="float32")
        for step in range(3):
            jj = j + 0.1 * step * j.roll(1, dims=1)
            torch.testing.assert_close(b(c * jj), c * a(jj), rtol=1e-4, atol=1e-9)


# --- state ---------------------------------------------------------------------------------


@pytest.mark.parametrize("state_dtype", ["float16", "float32"])
def test_state_dict_round_trip_reproduces_the_next_update(state_dtype):
    j = aligned_jacobians(5, 2, 64)
    original = GML2O(state_dtype=state_dtype)
    for step in range(3):
        original(j[step])
    assert int(original.accepted) == 3  # so the saved state has advanced
    saved = {k: v.clone() for k, v in original.state_dict().items()}
    restored = GML2O(state_dtype=state_dtype)
    restored.load_state_dict(saved)
    assert int(restored.steps) == 3 and int(restored.decisions) == 3
    assert restored.acceptance_rate == original.acceptance_rate
    for step in (3, 4):
        torch.testing.assert_close(restored(j[step]), original(j[step]), rtol=0, atol=0)
    # The state matters: a fresh instance gives another update.
    fresh = ML2O(state_dtype=state_dtype)
    carried = ML2O(state_dtype=state_dtype)
    carried.load_state_dict({k: v for k, v in saved.items() if k in carried.state_dict()})
    assert not torch.allclose(fresh(j[3]), carried(j[3]))


def test_new_shape_starts_a_fresh_state():
    method = ML2O()
    method(jacobian(2, 10))
    with pytest.warns(UserWarning, match="fresh state"):
        method(jacobian(3, 10))
    assert int(method.steps) == 1 and method.hidden.shape[0] == 10


# --- the guard -----------------------------------------------------------------------------


def test_guard_rejects_an_ascent_direction_and_takes_the_baseline():
    j = jacobian(3, 40, seed=11)
    guard = GML2O(net=with_gains(-1.0))  # d = −d*: an ascent direction for every objective
    d = guard(j)
    assert guard.last_accepted is False and guard.acceptance_rate == 0.0
    torch.testing.assert_close(d, mgda_direction(j), rtol=1e-5, atol=1e-7)
    assert torch.allclose(guard.last_weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_guard_rejects_a_too_long_step_and_accepts_a_good_one():
    j = jacobian(2, 40, seed=12)
    long = GML2O(net=with_gains(20.0))  # a descent direction, but 20× MGDA's length
    long(j)
    assert long.last_accepted is False
    good = GML2O(net=with_gains(2.0))  # 2 d*: ⟨2d*, g_i⟩ ≥ 2‖d*‖², length ratio 2
    d = good(j)
    assert good.last_accepted is True and good.acceptance_rate == 1.0
    torch.testing.assert_close(d, 2 * mgda_direction(j), rtol=1e-5, atol=1e-7)
    # The mean gradient conflicts with one objective here: the guard refuses it.
    conflict = torch.tensor([[1.0, 0.0], [-2.0, 0.1]])
    mean_only = GML2O(net=with_gains(0.0, 1.0))
    mean_only(conflict)
    assert mean_only.last_accepted is False
    assert not accepts(conflict, conflict.mean(0), mgda_direction(conflict), 0.5, 10.0)


def _stateful_net(a: float) -> ML2ONet:
    """``a · d*`` plus a small head on the shared LSTM state, so the update depends on the
    recurrent state (the zero head of :func:`with_gains` would hide it)."""
    net = with_gains(a)
    with torch.no_grad():
        net.head.weight.copy_(0.05 * torch.linspace(-1.0, 1.0, net.shared_hidden)[None])
        net.head.bias.fill_(0.01)
    return net


def test_a_rejected_learned_step_leaves_the_recurrent_state_where_it_was():
    js = aligned_jacobians(3, 2, 48, seed=30)
    net = _stateful_net(2.0)  # ≈ 2 d*: accepted at max_ratio 10, refused at max_ratio 1
    guarded, skipped = GML2O(net=net), GML2O(net=net)
    guarded(js[0])
    skipped(js[0])
    assert guarded.last_accepted and skipped.last_accepted
    before = guarded.hidden.clone()
    guarded.max_ratio = 1.0  # the same learned step is now too long: MGDA's is taken
    d = guarded(js[1])
    assert guarded.last_accepted is False
    torch.testing.assert_close(d, mgda_direction(js[1]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(guarded.hidden, before, rtol=0, atol=0)
    assert int(guarded.decisions) == 2 and int(guarded.accepted) == 1
    guarded.max_ratio = 10.0
    # A checkpoint taken after the rejection resumes to the same next update.
    resumed = GML2O(net=net)
    resumed.load_state_dict({k: v.clone() for k, v in guarded.state_dict().items()})
    # The rejected step left no trace: the next update is that of a run that never saw it ...
    after_rejection = guarded(js[2])
    assert guarded.last_accepted
    torch.testing.assert_close(after_rejection, skipped(js[2]), rtol=0, atol=0)
    torch.testing.assert_close(guarded.hidden, skipped.hidden, rtol=0, atol=0)
    torch.testing.assert_close(resumed(js[2]), after_rejection, rtol=0, atol=0)
    # ... and the state matters: a run whose state did advance on js[1] gives another one.
    advanced = ML2O(net=net)
    for j in js[:2]:
        advanced(j)
    assert not torch.allclose(advanced(js[2]), after_rejection)
    # With every learned step refused, the state stays the fresh (zero) one.
    refused = GML2O(net=_stateful_net(-1.0))
    for j in js:
        refused(j)
    assert refused.acceptance_rate == 0.0 and int(refused.steps) == 3
    assert refused.hidden.shape[0] == 48 and not refused.hidden.any()


def test_gml2o_steps_are_common_descent_directions():
    for seed in range(20):
        m = 2 + seed % 3
        method = GML2O()
        for step in range(4):
            j = jacobian(m, 50, seed=seed * 10 + step)
            d = method(j).double()
            baseline = mgda_direction(j).double()
            inner = j.double() @ d
            assert (inner >= 0.5 * float(baseline @ baseline) * (1 - 1e-9) - 1e-12).all()


def test_gml2o_drives_pareto_stationarity_to_zero_on_a_quadratic():
    problem = Quadratic(30, 3, seed=0)
    x = problem.initial(torch.Generator().manual_seed(0))
    method = GML2O()
    norms = []
    for _ in range(150):
        xg = x.clone().requires_grad_(True)
        values = problem.losses(xg, full=True)
        j = torch.stack([torch.autograd.grad(v, xg, retain_graph=True)[0] for v in values])
        norms.append(float(mgda_direction(j).norm()))
        x = x - problem.lr * method(j)
    assert norms[-1] < 0.05 * norms[0]
    assert method.acceptance_rate is not None and 0.0 <= method.acceptance_rate <= 1.0


# --- the engine ----------------------------------------------------------------------------


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(2))

    def forward(self, x):
        z = self.trunk(x)
        return torch.cat([h(z) for h in self.heads], dim=1)


def _losses(model, x, y):
    return ((model(x) - y) ** 2).mean(0)


@pytest.mark.parametrize("name", ["ml2o", "gml2o"])
def test_engine_injects_the_update_and_checkpoints_it(name):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, generator=g), torch.randn(16, 2, generator=g)
    model = TwoHeads()
    params = list(model.parameters())
    engine = MultiObjectiveEngine(name, params)
    reference = get_aggregator(name)
    optimizer = torch.optim.SGD(params, lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        losses = _losses(model, x, y)
        j = torch.stack(
            [
                torch.cat(
                    [g.reshape(-1) for g in torch.autograd.grad(v, params, retain_graph=True)]
                )
                for v in losses
            ]
        )
        expected = reference(j)
        engine(losses).backward()
        got = torch.cat([p.grad.reshape(-1) for p in params])
        torch.testing.assert_close(got, expected)
        assert engine.last_weights is not None and engine.last_weights.shape == (2,)
        optimizer.step()
    # Checkpoint / resume through the engine: the same next update.
    state = engine.state_dict()
    resumed = MultiObjectiveEngine(name, params)
    resumed.load_state_dict(state)
    losses = _losses(model, x, y)
    optimizer.zero_grad()
    engine(losses).backward()
    first = [p.grad.clone() for p in params]
    optimizer.zero_grad()
    resumed(_losses(model, x, y)).backward()
    for a, b in zip(first, params):
        torch.testing.assert_close(b.grad, a, rtol=0, atol=0)


def test_a_partition_of_the_coordinates_gives_the_same_update_and_state():
    """ZeRO-1/2: each rank runs the network on its columns of J with its rows of the state and
    the full Jacobian's Gram; the pieces are the one-process update and state."""
    js = aligned_jacobians(3, 3, 90, seed=41)
    whole = ML2O(state_dtype="float32")
    halves = [ML2O(state_dtype="float32"), ML2O(state_dtype="float32")]
    cut = [slice(0, 37), slice(37, 90)]
    for j in js:
        expected = whole(j)
        gram = (j @ j.T).double()
        pieces = [
            method.compute_update_sharded(j[:, part], gram, 90, lambda t: t)
            for method, part in zip(halves, cut)
        ]
        torch.testing.assert_close(torch.cat(pieces), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        torch.cat([h.hidden for h in halves]), whole.hidden, rtol=1e-4, atol=1e-5
    )


def test_a_sharded_state_resumes_only_on_its_own_rank_and_world_size():
    model = TwoHeads()
    engine = MultiObjectiveEngine("gml2o", list(model.parameters()))
    state = engine.state_dict()
    assert "shard" not in state and not engine.state_is_sharded
    state["shard"] = {"world_size": 2, "rank": 1, "size": 10}
    with pytest.raises(ValueError, match="same world size"):
        MultiObjectiveEngine("gml2o", list(model.parameters())).load_state_dict(state)


def test_engine_refuses_feature_level():
    model = TwoHeads()
    with pytest.raises(NotImplementedError, match="feature-level"):
        MultiObjectiveEngine("gml2o", list(model.parameters()), feature_level=True)
    with pytest.raises(ValueError, match="trainable parameters"):
        MultiObjectiveEngine("ml2o", [])


class _Zero3Engine:
    """What the engine reads of a DeepSpeed ZeRO-3 engine before its first backward."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def zero_optimization_stage(self) -> int:
        return 3

    def gradient_accumulation_steps(self) -> int:
        return self.steps

    def backward(self, loss):  # pragma: no cover - never reached
        raise AssertionError("the refusal comes first")


@pytest.mark.parametrize("steps, accumulation", [(2, "micro"), (2, "full"), (1, "full")])
def test_zero3_refuses_gradient_accumulation_with_a_clear_error(steps, accumulation):
    """Under ZeRO-3 ML2O / GML2O write the step's gradient partitions: one micro-batch per
    step, as for the gradient-level methods' m + 1 path."""
    model = TwoHeads()
    engine = MultiObjectiveEngine(
        "gml2o",
        list(model.parameters()),
        accelerator=_Zero3Engine(steps),
        accumulation=accumulation,
    )
    losses = _losses(model, torch.randn(4, 5), torch.randn(4, 2))
    with pytest.raises(ValueError, match="gradient partitions.*gradient_accumulation_steps = 1"):
        engine(losses, sync=True)


# --- weights and meta-training -------------------------------------------------------------


def test_shipped_weights_load_and_carry_their_card():
    path = default_weights_path()
    assert path.is_file() and path.stat().st_size < 64_000
    assert (path.parent / "CARD.md").is_file()
    net = load_network("default")
    untrained = ML2ONet(**net.config())
    assert not torch.allclose(net.head.weight, untrained.head.weight)  # really trained
    info = network_info()
    assert info["meta_steps"] > 0 and info["wall_seconds"] > 0
    assert set(info["validation_trained"]) == set(info["validation_untrained_mgda"])


def test_meta_training_runs_and_round_trips_through_a_file(tmp_path):
    config = MetaConfig(
        iterations=4,
        unroll=4,
        truncation=2,
        families={"quadratic": 1.0, "synthetic": 1.0},
        validation_per_family=1,
        log_every=2,
    )
    lines = []
    net, summary = meta_train(config, log=lines.append)
    assert summary["meta_steps"] == 4 and any("meta-step" in line for line in lines)
    assert not torch.equal(net.gains.detach(), torch.tensor([1.0, 0.0]))  # it learned something
    path = save_network(net, tmp_path / "w.safetensors", note="test")
    again = load_network(path)
    for a, b in zip(net.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a.float(), b)
    assert network_info(path)["note"] == "test"
    # The meta-loss: 0 at the start, negative with progress, scale-free per objective.
    start = torch.tensor([2.0, 300.0])
    assert float(progress(start, start, 0.01)) == pytest.approx(0.0, abs=1e-7)
    assert float(progress(start / 2, start, 0.01)) < 0
    assert float(progress(torch.tensor([1.0, 150.0]), start, 0.01)) == pytest.approx(
        float(progress(torch.tensor([0.01, 1.5]), torch.tensor([0.02, 3.0]), 0.01))
    )


# --- two processes -------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_ddp_two_processes_match_one_process():
    spec = importlib.util.spec_from_file_location(
        "test_mograd_engine", REPO / "tests" / "test_mograd_engine.py"
    )
    engine_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(engine_tests)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = engine_tests._launch(Path(tmp), "ddp", "--methods", "gml2o,ml2o")
    step = engine_tests._step_module()
    for method in ("gml2o", "ml2o"):
        reference = step.run(None, method, 2)
        for name in reference:
            # float16 recurrent state: equal up to its rounding of slightly different sums.
            torch.testing.assert_close(results[method][name], reference[name], rtol=1e-3, atol=1e-5)


def _assert_sharded_gml2o_matches_one_process(backend: str, ranks: tuple[int, int]) -> None:
    """Two ``backend`` processes vs one process on the union batch for GML2O: the parameters
    after two steps, the guard's decisions and the state — the ranks' partitions put back in
    parameter order with the layout each rank reports — are the one-process run's."""
    spec = importlib.util.spec_from_file_location(
        "test_mograd_engine", REPO / "tests" / "test_mograd_engine.py"
    )
    engine_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(engine_tests)
    import tempfile

    ranks_option = ",".join(str(r) for r in ranks)
    with tempfile.TemporaryDirectory() as tmp:
        results = engine_tests._launch(
            Path(tmp), backend, "--methods", "gml2o", "--ranks", ranks_option
        )
    step = engine_tests._step_module()
    states = []
    reference = step.run(None, "gml2o", 2, states=states, ranks=ranks)
    for name in reference:
        torch.testing.assert_close(results["gml2o"][name], reference[name], rtol=1e-3, atol=1e-5)
    sizes = [p.numel() for p in step.build_model(ranks).parameters() if p.requires_grad]
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    ranks_states = results["states/gml2o"]
    for k, expected in enumerate(states):
        for key in ("steps", "accepted", "decisions"):
            assert (
                int(ranks_states[0][k][key]) == int(ranks_states[1][k][key]) == int(expected[key])
            ), key
        hidden = torch.zeros_like(expected["hidden"])
        covered = 0
        for record in (ranks_states[0][k], ranks_states[1][k]):
            offset = 0
            for index, start, count in record["layout"]:
                begin = offsets[index] + start
                hidden[begin : begin + count] = record["hidden"][offset : offset + count]
                offset += count
                covered += count
            assert offset == record["hidden"].shape[0]  # one state row per held coordinate
        assert covered == hidden.shape[0]  # the partitions tile the coordinates
        # float16 state: equal up to its rounding of slightly different sums.
        torch.testing.assert_close(hidden.float(), expected["hidden"].float(), rtol=0, atol=4e-3)
    assert int(states[-1]["accepted"]) >= 1  # the learned step was taken: the state advanced


@pytest.mark.multiprocess
def test_zero2_two_processes_give_the_same_update_and_state_as_one_process():
    """GML2O under ZeRO-2: each rank runs the network on its gradient partition with that
    partition's recurrent state."""
    _assert_sharded_gml2o_matches_one_process("zero2", (2, 2))


@pytest.mark.multiprocess
def test_zero3_two_processes_give_the_same_update_and_state_as_one_process():
    """GML2O under ZeRO-3: each rank runs the network on its ``safe_get_local_grad``
    partitions (without their padding: r1 = 3 gives 9-element tensors, split 5 + 4 and a pad)
    with that partition's state, and its part of the update reaches the optimizer."""
    _assert_sharded_gml2o_matches_one_process("zero3", (3, 2))
