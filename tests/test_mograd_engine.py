"""The multi-gradient engine inside a training step: one process, DDP and DeepSpeed ZeRO.

The multi-process tests launch ``tests/distributed/mograd_step.py`` on two CPU processes (gloo)
and compare the adapter after two optimizer steps with one process on the union of the
processes' batches, computed here with the same module.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from launching import accelerate_launch
from torch import nn

from align.mograd import get_aggregator
from align.mograd.engine import MultiObjectiveEngine

REPO = Path(__file__).resolve().parents[1]
STEP_SCRIPT = REPO / "tests" / "distributed" / "mograd_step.py"
GRADIENT_METHODS = ["mgda", "pcgrad", "upgrad", "cagrad", "imtl_g"]
#: Issue 15's additions: through the engine's Gram path on one process, DDP and ZeRO-2.
NEW_GRADIENT_METHODS = ["aligned_mtl", "config", "dualproj", "fairgrad", "gradvac"]
NEW_LOSS_METHODS = ["pbi", "cosmos"]


def _step_module():
    spec = importlib.util.spec_from_file_location("mograd_step", STEP_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TwoHeads(nn.Module):
    """A shared trunk ``z = tanh(W x)`` and one linear head per objective."""

    def __init__(self, m: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(m))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.trunk(x)
        return torch.cat([head(z) for head in self.heads], dim=1), z


def problem(m: int = 3, seed: int = 0, rows: slice = slice(None)):
    model = TwoHeads(m, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(16, 6, generator=generator)[rows]
    y = torch.randn(16, m, generator=generator)[rows]
    return model, x, y


def losses_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    out, z = model(x)
    return ((out - y) ** 2).mean(dim=0), z


def grads_of(params) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def jacobian_of(losses: torch.Tensor, params) -> torch.Tensor:
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


# ----------------------------------------------------------------------------- one process


@pytest.mark.parametrize("jacobian", ["loop", "batched"])
@pytest.mark.parametrize("method", GRADIENT_METHODS + NEW_GRADIENT_METHODS)
def test_injected_update_equals_backward_of_the_weighted_sum(method, jacobian):
    model, x, y = problem()
    params = list(model.parameters())
    engine = MultiObjectiveEngine(method, params, jacobian=jacobian)
    losses, _ = losses_of(model, x, y)
    loss = engine(losses)
    weights = engine.last_weights
    # The value is Σ w_i L_i; the weights are the method's on the Gram of the true Jacobian.
    torch.testing.assert_close(loss, (weights.to(losses) * losses).sum().detach())
    jacobian_matrix = jacobian_of(losses, params)
    gram = (jacobian_matrix @ jacobian_matrix.T).double()
    torch.testing.assert_close(engine.last_gram, gram, rtol=1e-5, atol=1e-7)
    loss.backward()
    injected = grads_of(params)

    # The m + 1 backward way: Σ w_i L_i with the same (detached) weights.
    reference_model, _, _ = problem()
    reference_losses, _ = losses_of(reference_model, x, y)
    (weights.to(reference_losses) * reference_losses).sum().backward()
    torch.testing.assert_close(injected, grads_of(reference_model.parameters()))
    torch.testing.assert_close(injected, weights.float() @ jacobian_matrix, rtol=1e-5, atol=1e-6)


def test_weights_are_the_methods_on_an_independent_gram():
    model, x, y = problem()
    params = list(model.parameters())
    losses, _ = losses_of(model, x, y)
    engine = MultiObjectiveEngine("mgda", params)
    engine(losses)
    jacobian_matrix = jacobian_of(losses, params).double()
    expected = get_aggregator("mgda").weights(jacobian_matrix @ jacobian_matrix.T)
    torch.testing.assert_close(engine.last_weights.double(), expected.double(), atol=1e-6, rtol=0)
    # MGDA's d is a common descent direction: g_i · d >= 0 for every objective.
    direction = engine.last_weights.double() @ jacobian_matrix
    assert (jacobian_matrix @ direction >= -1e-9).all()


# The counting hook sits on the first layer, whose input needs no gradient: torch says so.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_gradient_level_backpropagates_the_model_m_times_not_m_plus_one():
    model, x, y = problem(m=3)
    passes = []
    model.trunk[0].register_full_backward_hook(lambda *args: passes.append(1))
    engine = MultiObjectiveEngine("mgda", list(model.parameters()))
    losses, _ = losses_of(model, x, y)
    loss = engine(losses)
    assert len(passes) == 3
    loss.backward()
    assert len(passes) == 3  # the injected update does not go through the model again


LOSS_METHODS = [
    ("linear", {}),
    ("stch", {}),
    ("tch", {}),
    ("dwa", {}),
    ("uw", {"num_objectives": 3}),
    ("pbi", {}),
    ("cosmos", {}),
]


@pytest.mark.parametrize("method,options", LOSS_METHODS, ids=[m for m, _ in LOSS_METHODS])
def test_loss_level_methods_return_exactly_their_scalar(method, options):
    model, x, y = problem()
    preference = torch.tensor([0.2, 0.3, 0.5])
    losses, _ = losses_of(model, x, y)
    engine = MultiObjectiveEngine(method, **options)
    loss = engine(losses, preference)
    expected = get_aggregator(method, **options)(losses, preference)
    assert torch.equal(loss.detach(), expected.detach())
    loss.backward()
    got = grads_of(model.parameters())
    reference_model, _, _ = problem()
    reference_losses, _ = losses_of(reference_model, x, y)
    get_aggregator(method, **options)(reference_losses, preference).backward()
    torch.testing.assert_close(got, grads_of(reference_model.parameters()), rtol=0, atol=0)


def test_tiny_language_model_with_a_pblora_adapter():
    step = _step_module()
    model = step.build_model()
    params = [p for p in model.parameters() if p.requires_grad]
    ids = step.global_batch(2, 1)[0]
    engine = MultiObjectiveEngine("mgda", params)
    losses, _ = step.objective_losses(model, ids)
    engine(losses, step.PREFERENCE).backward()
    injected = grads_of(params)
    weights = engine.last_weights
    assert float(weights.min()) > 0 and float(weights.max()) < 1  # a real trade-off

    reference = step.build_model()
    reference_params = [p for p in reference.parameters() if p.requires_grad]
    reference_losses, _ = step.objective_losses(reference, ids)
    jacobian_matrix = jacobian_of(reference_losses, reference_params)
    assert (jacobian_matrix @ injected >= 0).all()  # a common descent direction
    (weights.to(reference_losses) * reference_losses).sum().backward()
    torch.testing.assert_close(injected, grads_of(reference_params), rtol=1e-5, atol=1e-7)


def test_micro_batches_add_their_own_updates():
    model, x, y = problem()
    params = list(model.parameters())
    engine = MultiObjectiveEngine("mgda", params)
    expected = 0
    for rows in (slice(0, 8), slice(8, 16)):
        losses, _ = losses_of(model, x[rows], y[rows])
        (engine(losses) / 2).backward()
        jacobian_matrix = jacobian_of(losses_of(model, x[rows], y[rows])[0], params)
        expected = expected + engine.last_weights.float() @ jacobian_matrix / 2
    torch.testing.assert_close(grads_of(params), expected, rtol=1e-5, atol=1e-7)


def test_full_accumulation_is_the_method_on_the_effective_batch():
    model, x, y = problem()
    params = list(model.parameters())
    engine = MultiObjectiveEngine("mgda", params, accumulation="full")
    losses, _ = losses_of(model, x[:8], y[:8])
    (engine(losses, sync=False) / 2).backward()
    assert grads_of(params).abs().max() == 0  # nothing before the boundary
    losses, _ = losses_of(model, x[8:], y[8:])
    (engine(losses, sync=True) / 2).backward()

    union, _ = losses_of(model, x, y)  # equal halves: the union's J is the mean of theirs
    jacobian_matrix = jacobian_of(union, params).double()
    weights = get_aggregator("mgda").weights(jacobian_matrix @ jacobian_matrix.T)
    torch.testing.assert_close(engine.last_weights.double(), weights.double(), atol=1e-6, rtol=0)
    expected = (weights.double() @ jacobian_matrix).float()
    torch.testing.assert_close(grads_of(params), expected, rtol=1e-5, atol=1e-6)


def _gradient_and_update_level_methods() -> list[str]:
    """Every registered method that needs the per-objective gradients, once by canonical name."""
    from align.mograd.registry import aggregator_class, canonical_aggregators

    return [
        name
        for name in canonical_aggregators()
        if getattr(aggregator_class(name), "kind", None) in ("gradient", "update")
    ]


@pytest.mark.parametrize("method", _gradient_and_update_level_methods())
def test_full_accumulation_over_k_micro_batches_is_one_big_batch(method):
    """Issue 15: under "full", k micro-batches (each scalar scaled by 1/k, as the trainers do)
    give the update the method gives on the effective batch — also for methods whose update
    does not scale with J (Nash-MTL: J and 4J give the same d), which used to come out k× small.
    """
    k = 4
    preference = torch.tensor([0.2, 0.3, 0.5])
    model, x, y = problem()
    params = list(model.parameters())
    engine = MultiObjectiveEngine(method, params, accumulation="full")
    rows = x.shape[0] // k
    for i in range(k):
        part = slice(i * rows, (i + 1) * rows)
        losses, _ = losses_of(model, x[part], y[part])
        (engine(losses, preference, sync=i == k - 1) / k).backward()
    accumulated = grads_of(params)

    big_model, _, _ = problem()
    big_params = list(big_model.parameters())
    losses, _ = losses_of(big_model, x, y)  # equal parts: its J is the mean of theirs
    MultiObjectiveEngine(method, big_params)(losses, preference).backward()
    one_batch = grads_of(big_params)
    assert float(one_batch.norm()) > 1e-4
    torch.testing.assert_close(
        accumulated, one_batch, rtol=1e-4, atol=1e-6 * float(one_batch.norm())
    )


def test_famo_in_the_engine_steps_once_per_optimizer_step_on_consecutive_mean_losses():
    """Issue 15: FAMO's logits take one step per optimizer step (not per micro-batch), on the
    change between consecutive steps' mean losses (oracle: torch's Adam on ⟨softmax(ξ), δ⟩),
    and stay the same through the micro-batches of a step."""
    engine = MultiObjectiveEngine("famo")
    reference = torch.zeros(2, requires_grad=True)
    adam = torch.optim.Adam([reference], lr=0.025, weight_decay=1e-3)
    generator = torch.Generator().manual_seed(0)
    means = []
    for step in range(4):
        batch = [torch.rand(2, generator=generator, dtype=torch.float64) + 0.5 for _ in range(3)]
        start = engine.aggregator.logits.clone()
        for i, losses in enumerate(batch):
            # Every micro-batch of the step is combined with the same logits.
            assert torch.equal(engine.aggregator.logits, start) or step == 0
            engine(losses.clone().requires_grad_(), sync=i == len(batch) - 1)
        means.append(torch.stack(batch).mean(dim=0))
        if step > 0:
            delta = means[-2].log() - means[-1].log()
            adam.zero_grad()
            (torch.softmax(reference, 0) * delta.float()).sum().backward()
            adam.step()
        torch.testing.assert_close(
            engine.aggregator.logits.float(), reference.detach(), atol=1e-6, rtol=0
        )
    assert int(engine.aggregator.adam_steps) == 3
    assert float(engine.aggregator.logits.abs().max()) > 0.01  # it moved


class FakeAccelerator:
    """What the engine reads from an Accelerator: the fp16 scaler and the boundary flag."""

    def __init__(self, scale: float = 2.0**12) -> None:
        self.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        self.sync_gradients = True


def test_fp16_loss_scale_is_divided_out_and_overflow_skips_the_step():
    model, x, y = problem()
    params = list(model.parameters())
    accelerator = FakeAccelerator()
    engine = MultiObjectiveEngine("mgda", params, accelerator=accelerator)
    plain = MultiObjectiveEngine("mgda", params)
    losses, _ = losses_of(model, x, y)
    plain(losses)
    loss = engine(losses)
    torch.testing.assert_close(engine.last_gram, plain.last_gram, rtol=1e-5, atol=1e-7)
    accelerator.scaler.scale(loss).backward()
    optimizer = torch.optim.SGD(params, lr=0.1)
    accelerator.scaler.unscale_(optimizer)
    torch.testing.assert_close(
        grads_of(params),
        plain.last_weights.float() @ jacobian_of(losses, params),
        atol=1e-6,
        rtol=1e-5,
    )
    optimizer.zero_grad()
    accelerator.scaler.update()  # (no step taken: only resets the scaler's per-step state)

    # An infinite gradient (sqrt at 0) with finite losses: no error, a non-finite update, and
    # the scaler skips the step and halves its scale, as for a plain loss.
    losses, _ = losses_of(model, x, y)
    losses = losses + torch.stack(
        [
            torch.sqrt(params[0][0, 0] - params[0][0, 0].detach()),
            *[torch.zeros(()) for _ in range(2)],
        ]
    )
    before = [p.detach().clone() for p in params]
    accelerator.scaler.scale(engine(losses)).backward()
    accelerator.scaler.step(optimizer)
    accelerator.scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert accelerator.scaler.get_scale() == 2.0**11
    with pytest.raises(ValueError, match="not finite"):
        plain(losses)


@pytest.mark.parametrize("trainable_heads", [True, False])
def test_feature_level_takes_the_gram_at_the_features_with_one_model_backward(trainable_heads):
    model, x, y = problem(m=3)
    model.heads.requires_grad_(trainable_heads)
    trunk_passes, head_passes = [], []
    model.trunk[0].register_full_backward_hook(lambda *args: trunk_passes.append(1))
    model.heads[0].register_full_backward_hook(lambda *args: head_passes.append(1))
    engine = MultiObjectiveEngine("mgda", feature_level=True)
    losses, z = losses_of(model, x, y)
    feature_jacobian = torch.stack(
        [torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1) for loss in losses]
    ).double()
    head_passes.clear()
    loss = engine(losses, features=z)
    assert trunk_passes == []  # the features' gradients stop at z
    assert len(head_passes) == 3
    expected = get_aggregator("mgda").weights(feature_jacobian @ feature_jacobian.T)
    torch.testing.assert_close(engine.last_weights.double(), expected.double(), atol=1e-6, rtol=0)
    loss.backward()
    assert len(trunk_passes) == 1
    # With frozen heads, z is a bottleneck: the backward starts at z with Σ w_i ∇_z L_i and
    # does not go through the heads again; with trainable heads it must (their gradients).
    assert len(head_passes) == (4 if trainable_heads else 3)
    params = [p for p in model.parameters() if p.requires_grad]
    got = grads_of(params)
    reference, _, _ = problem(m=3)
    reference.heads.requires_grad_(trainable_heads)
    reference_losses, _ = losses_of(reference, x, y)
    (engine.last_weights.to(reference_losses) * reference_losses).sum().backward()
    torch.testing.assert_close(
        got, grads_of([p for p in reference.parameters() if p.requires_grad]), rtol=1e-5, atol=1e-7
    )


def test_clear_errors():
    model, x, y = problem()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="gradient-level method: pass the trainable parameters"):
        MultiObjectiveEngine("mgda")
    with pytest.raises(ValueError, match="accumulation must be one of"):
        MultiObjectiveEngine("mgda", params, accumulation="sometimes")
    with pytest.raises(ValueError, match="accumulation='micro'"):
        MultiObjectiveEngine("mgda", feature_level=True, accumulation="full")
    losses, z = losses_of(model, x, y)
    with pytest.raises(ValueError, match="pass features="):
        MultiObjectiveEngine("mgda", feature_level=True)(losses)
    with pytest.raises(ValueError, match="require grad"):
        MultiObjectiveEngine("mgda", feature_level=True)(losses, features=z.detach())
    with pytest.raises(ValueError, match="unknown multi-gradient method"):
        MultiObjectiveEngine("no-such-method", params)
    # Parameters under DeepSpeed ZeRO without the accelerator that owns them.
    params[0]._hp_mapping = None
    try:
        with pytest.raises(ValueError, match="pass accelerator="):
            MultiObjectiveEngine("mgda", params)(losses)
    finally:
        del params[0]._hp_mapping
    # Reentrant gradient checkpointing refuses torch.autograd.grad: say what to do.
    out = torch.utils.checkpoint.checkpoint(model.trunk, x.requires_grad_(), use_reentrant=True)
    checkpointed = torch.stack([(out**2).mean(), out.mean(), (out**3).mean()])
    with pytest.raises(ValueError, match="use_reentrant"):
        MultiObjectiveEngine("mgda", params)(checkpointed)
    with pytest.raises(ValueError, match="none of the losses"):
        MultiObjectiveEngine("mgda", params)(torch.tensor([1.0, 2.0, 3.0]))


def test_state_dict_round_trip_and_observe():
    engine = MultiObjectiveEngine("stch", ideal="running")
    losses = torch.tensor([0.5, 0.25, 1.0])
    engine(losses, torch.tensor([0.2, 0.3, 0.5]))  # one step (sync defaults to True): observed
    assert torch.equal(engine.aggregator.running_min, losses.double())
    with pytest.raises(ValueError, match="observe='manual'"):
        engine.observe(losses)  # it would count the step twice
    state = engine.state_dict()
    fresh = MultiObjectiveEngine("stch", ideal="running")
    fresh.load_state_dict(state)
    preference = torch.tensor([0.2, 0.3, 0.5])
    probe = torch.tensor([0.7, 0.2, 0.9])
    assert torch.equal(engine(probe, preference), fresh(probe, preference))


# ------------------------------------------------------------------------- two processes


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }


def _accelerate_config(tmp_path: Path, backend: str) -> Path:
    common = (
        "compute_environment: LOCAL_MACHINE\nuse_cpu: true\nnum_machines: 1\nnum_processes: 2\n"
        "machine_rank: 0\nmixed_precision: 'no'\nrdzv_backend: static\nsame_network: true\n"
    )
    if backend == "ddp":
        body = "distributed_type: MULTI_GPU\n"
    else:
        stage = backend.removeprefix("zero")
        body = (
            "distributed_type: DEEPSPEED\ndeepspeed_config:\n"
            f"  zero_stage: {stage}\n  offload_optimizer_device: none\n"
            "  offload_param_device: none\n  zero3_init_flag: false\n  gradient_clipping: 1.0\n"
        )
    path = tmp_path / f"{backend}.yaml"
    path.write_text(body + common)
    return path


def _launch(tmp_path: Path, backend: str, *arguments: str) -> dict:
    out = tmp_path / f"{backend}.pt"
    env = _env()
    if backend == "ddp":
        env["ACCELERATE_USE_CPU"] = "1"  # else `accelerate launch` starts one process
    result = accelerate_launch(
        _accelerate_config(tmp_path, backend), str(STEP_SCRIPT), str(out), *arguments, env=env
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = torch.load(out)
    assert results["world_size"] == 2
    expected_type = "MULTI_CPU" if backend == "ddp" else "DEEPSPEED"
    assert results["distributed_type"].endswith(expected_type)
    return results


def _assert_matches_one_process(results: dict, methods: list[str], **options) -> dict:
    step = _step_module()
    initial = {n: p.detach() for n, p in step.build_model().named_parameters() if p.requires_grad}
    references = {}
    for method in methods:
        reference = step.run(None, method, 2, **options)
        got = results[method]
        assert got.keys() == reference.keys()
        moved = max(float((reference[n] - initial[n]).abs().max()) for n in reference)
        assert moved > 1e-3, "the steps must change the adapter for the comparison to mean much"
        for name in reference:
            torch.testing.assert_close(got[name], reference[name], rtol=1e-5, atol=1e-6)
        references[method] = reference
    return references


def _differ(a: dict, b: dict) -> bool:
    return max(float((a[n] - b[n]).abs().max()) for n in a) > 1e-5


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_two_processes_match_one_process_on_the_union_batch(tmp_path, backend):
    methods = ["linear", "stch", "mgda", *NEW_GRADIENT_METHODS, *NEW_LOSS_METHODS]
    results = _launch(tmp_path, backend, "--methods", ",".join(methods))
    references = _assert_matches_one_process(results, methods)
    assert _differ(references["mgda"], references["linear"])  # MGDA is not LS here


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ddp_feature_level_full_accumulation_and_batched_jacobian(tmp_path):
    results = _launch(tmp_path, "ddp", "--methods", "mgda,pcgrad", "--feature-level")
    _assert_matches_one_process(results, ["mgda", "pcgrad"], feature_level=True)
    options = {"accumulation": "full", "micro_batches": 2}
    results = _launch(
        tmp_path,
        "ddp",
        "--methods",
        "mgda,upgrad",
        "--accumulation",
        "full",
        "--micro-batches",
        "2",
    )
    _assert_matches_one_process(results, ["mgda", "upgrad"], **options)
    results = _launch(
        tmp_path, "ddp", "--methods", "mgda", "--micro-batches", "2", "--jacobian", "batched"
    )
    _assert_matches_one_process(results, ["mgda"], micro_batches=2, jacobian="batched")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero2_feature_level_and_full_accumulation(tmp_path):
    results = _launch(tmp_path, "zero2", "--methods", "mgda", "--feature-level")
    _assert_matches_one_process(results, ["mgda"], feature_level=True)
    results = _launch(
        tmp_path,
        "zero2",
        "--methods",
        "mgda,linear",
        "--accumulation",
        "full",
        "--micro-batches",
        "2",
    )
    _assert_matches_one_process(results, ["mgda", "linear"], accumulation="full", micro_batches=2)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero2_refuses_micro_accumulation_for_gradient_level_methods(tmp_path):
    out = tmp_path / "refused.pt"
    result = accelerate_launch(
        _accelerate_config(tmp_path, "zero2"),
        str(STEP_SCRIPT),
        str(out),
        *("--methods", "mgda", "--micro-batches", "2"),
        env=_env(),
    )
    assert result.returncode != 0
    assert "needs accumulation='full'" in result.stderr


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero3_matches_one_process(tmp_path):
    results = _launch(tmp_path, "zero3", "--methods", "linear,stch,mgda")
    _assert_matches_one_process(results, ["linear", "stch", "mgda"])
    results = _launch(tmp_path, "zero3", "--methods", "mgda", "--feature-level")
    _assert_matches_one_process(results, ["mgda"], feature_level=True)


@pytest.mark.multiprocess
def test_zero0_averages_the_losses_for_methods_that_read_them(tmp_path):
    """Issue 15: under ZeRO-0 (DeepSpeed without sharding) the ranks hold the same reduced J
    but their own losses; EPO and loss-normalised MGDA must see the mean losses on every rank
    (else each rank weighs differently and the averaged update matches nothing)."""
    methods = ["epo", "mgda_loss"]
    results = _launch(tmp_path, "zero0", "--methods", ",".join(methods))
    _assert_matches_one_process(results, methods)
    step = _step_module()
    for method in methods:
        reference = []
        step.run(None, method, 2, weights=reference)
        ranks = results[f"weights/{method}"]
        assert len(ranks) == 2 and len(ranks[0]) == len(reference) == step.STEPS
        for on_rank_0, on_rank_1, expected in zip(*ranks, reference):
            assert torch.equal(on_rank_0, on_rank_1), (method, on_rank_0, on_rank_1)
            torch.testing.assert_close(on_rank_0, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zero0", "zero1"])
def test_zero0_and_zero1_match_one_process(tmp_path, backend):
    results = _launch(tmp_path, backend, "--methods", "linear,mgda")
    _assert_matches_one_process(results, ["linear", "mgda"])
