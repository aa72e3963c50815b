"""Multi-objective GRPO (``trainer: mo_grpo``): TRL's own GRPOTrainer as the oracle of the
scalarised mode, the per-objective mode against the scalarised one, the α-conditioned policy's
per-row α, rewards from scorers / ARMs / PARMs, bad input, two processes (DDP, ZeRO-2) against
one, and a killed run's resume."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from align.adapters import PBLoraConfig, set_preference
from align.preference import Preference
from align.rewards.online import objective_rewards, prompt_shared_log_probs
from align.trainers.grpo import MOGRPOConfig, MOGRPOTrainer, objective_advantages

# The rewards the tiny random model's completions differ on (vowel share, shortness), shared
# with the launch script of the multi-process tests (and its recipes' python: rewards).
sys.path.insert(0, str(Path(__file__).parent / "distributed"))
from grpo_run import shortness, vowels  # noqa: E402
from launching import accelerate_launch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = ["How was the trip?", "Did you like the film?", "How was dinner?", "What about it?"]
COMMON = dict(
    per_device_train_batch_size=8,
    num_generations=4,
    max_completion_length=10,
    max_steps=2,
    learning_rate=5e-3,
    lr_scheduler_type="constant",
    report_to="none",
    use_cpu=True,
    bf16=False,
    logging_steps=1,
    save_strategy="no",
    seed=3,
)


def prompts(n: int = 16) -> Dataset:
    rows = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]
    return Dataset.from_dict({"prompt": rows})


@pytest.fixture()
def lora_policy(tiny_lm):
    model, tokenizer = tiny_lm
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    return get_peft_model(copy.deepcopy(model), config), tokenizer


def adapter_state(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry and "step" in entry]


def run_trl(policy, tokenizer, tmp_path, alpha, **options):
    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"), reward_weights=list(alpha), **{**COMMON, **options}
    )
    trainer = GRPOTrainer(
        copy.deepcopy(policy),
        reward_funcs=[vowels, shortness],
        args=args,
        train_dataset=prompts(),
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


def run_align(policy, tokenizer, tmp_path, name="align", **options):
    args = MOGRPOConfig(output_dir=str(tmp_path / name), **{**COMMON, **options})
    trainer = MOGRPOTrainer(
        copy.deepcopy(policy),
        {"vowels": vowels, "short": shortness},
        args=args,
        train_dataset=prompts(),
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


def assert_same_adapter(a, b, rtol=1e-5, atol=1e-6):
    first, second = adapter_state(a), adapter_state(b)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=rtol, atol=atol)


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_a_fixed_alpha_linear_run_is_trl_with_reward_weights_alpha(
    tmp_path, lora_policy, aggregation
):
    policy, tokenizer = lora_policy
    alpha = (0.3, 0.7)
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    trl = run_trl(policy, tokenizer, tmp_path, alpha, multi_objective_aggregation=aggregation)
    ours = run_align(
        policy,
        tokenizer,
        tmp_path,
        preference=list(alpha),
        multi_objective_aggregation=aggregation,
    )
    # The same completions (same seed, same generation), the same rewards and losses ...
    assert logged(ours, "rewards/vowels/mean") == logged(trl, "rewards/vowels/mean")
    assert logged(ours, "reward") == pytest.approx(logged(trl, "reward"), rel=1e-6)
    assert logged(ours, "loss") == pytest.approx(logged(trl, "loss"), abs=1e-6)  # ≈ 0 on-policy
    assert logged(ours, "grad_norm") == pytest.approx(logged(trl, "grad_norm"), rel=1e-4)
    # ... and the same adapter after two steps, which moved it.
    moved = max(float((p - before[n]).abs().max()) for n, p in adapter_state(trl).items())
    assert moved > 1e-3
    assert_same_adapter(trl, ours)
    assert logged(ours, "alpha/vowels/mean") == [pytest.approx(0.3)] * 2


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_per_objective_losses_under_the_linear_aggregator_equal_the_scalarised_mode(
    tmp_path, lora_policy, aggregation
):
    policy, tokenizer = lora_policy
    scalarised = run_align(
        policy,
        tokenizer,
        tmp_path,
        "s",
        preference=[0.4, 0.6],
        multi_objective_aggregation=aggregation,
    )
    per_objective = run_align(
        policy,
        tokenizer,
        tmp_path,
        "p",
        preference=[0.4, 0.6],
        multi_objective_aggregation=aggregation,
        mode="per_objective",
        aggregator="linear",
    )
    assert_same_adapter(scalarised, per_objective)
    assert logged(per_objective, "loss/vowels") and logged(per_objective, "weight/short")
    # MGDA on the same losses is another update (it is not LS here).
    mgda = run_align(
        policy,
        tokenizer,
        tmp_path,
        "m",
        preference=[0.4, 0.6],
        mode="per_objective",
        aggregator="mgda",
    )
    first, second = adapter_state(scalarised), adapter_state(mgda)
    assert max(float((first[n] - second[n]).abs().max()) for n in first) > 1e-5


def test_objective_advantages_sum_to_trls_combined_advantage_and_follow_its_nan_rule():
    from trl.trainer.utils import nanstd

    torch.manual_seed(1)
    rewards = torch.randn(12, 3)
    rewards[1, 0] = torch.nan  # one reward missing: counts as 0 in the sums
    rewards[5] = torch.nan  # no reward at all: advantage 0
    alpha = torch.tensor([[0.2, 0.3, 0.5]] * 4 + [[0.6, 0.2, 0.2]] * 4 + [[0.0, 0.0, 1.0]] * 4)
    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        parts = objective_advantages(rewards, alpha, 4, aggregation)
        combined = (parts * alpha).sum(dim=1)
        # TRL's formulas, written out (grpo_trainer._generate_and_score_completions).
        unscorable = torch.isnan(rewards).all(dim=1)
        if aggregation == "sum_then_normalize":
            total = (rewards * alpha).nansum(dim=1)
            total[unscorable] = torch.nan
            grouped = total.view(-1, 4)
            mean = torch.nanmean(grouped, dim=1).repeat_interleave(4)
            std = nanstd(grouped, dim=1).repeat_interleave(4)
            expected = (total - mean) / (std + 1e-4)
        else:
            grouped = rewards.view(-1, 4, 3)
            z = (grouped - torch.nanmean(grouped, 1, keepdim=True)) / (
                nanstd(grouped, 1, keepdim=True) + 1e-4
            )
            total = (z.view(12, 3) * alpha).nansum(dim=1)
            total[unscorable] = torch.nan
            expected = (total - torch.nanmean(total)) / (nanstd(total) + 1e-4)
        expected = torch.nan_to_num(expected, nan=0.0)
        torch.testing.assert_close(combined, expected, rtol=1e-5, atol=1e-6)
        assert torch.all(parts[5] == 0)
        assert torch.isfinite(parts).all()


def test_the_conditioned_policy_draws_alpha_per_prompt_group_and_scores_each_row_at_its_own(
    tmp_path, tiny_lm
):
    model, tokenizer = tiny_lm
    args = MOGRPOConfig(
        output_dir=str(tmp_path / "pb"),
        policy_adapter="pblora",
        adapter_rank=2,
        preference_rank=2,
        **COMMON,
    )
    trainer = MOGRPOTrainer(
        copy.deepcopy(model),
        {"vowels": vowels, "short": shortness},
        args=args,
        train_dataset=prompts(),
        processing_class=tokenizer,
    )
    assert trainer.conditioned
    seen = []
    original = trainer._generate

    def spy(prompts_):
        tuner = trainer.model.base_model
        seen.append(tuner.get_preference().weights.clone())
        return original(prompts_)

    trainer._generate = spy
    trainer.train()
    alpha = seen[0]
    assert alpha.shape == (8, 2)
    # One α per prompt group (4 completions), different groups different α, on the simplex.
    assert torch.equal(alpha[0], alpha[3]) and not torch.equal(alpha[0], alpha[4])
    torch.testing.assert_close(alpha.sum(dim=1), torch.ones(8, dtype=alpha.dtype))
    # Drawn from (seed, step, group): the same α again for the same step and group.
    trainer.state.global_step = 0  # the first round's
    torch.testing.assert_close(
        trainer.group_preferences(2).to(alpha), alpha[::4], rtol=0, atol=1e-6
    )
    trainer.state.global_step = 1
    assert not torch.allclose(trainer.group_preferences(2).to(alpha), alpha[::4])
    assert logged(trainer, "alpha/vowels/std")[0] > 0
    # The loss's per-row α: TRL's log-probs of a batch with one α per row equal each row's
    # log-probs at its own α alone.
    batch = torch.randint(3, 200, (4, 12))
    mask = torch.ones_like(batch)
    rows = torch.tensor([[0.1, 0.9], [0.9, 0.1], [0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    trainer.model.eval()
    with torch.no_grad():
        trainer._row_preference = rows
        together = trainer._get_per_token_logps_and_entropies(trainer.model, batch, mask, 6)[0]
        trainer._row_preference = None
        for row in range(4):
            set_preference(trainer.model, Preference(rows[row], ("vowels", "short")))
            alone = MOGRPOTrainer.__mro__[2]._get_per_token_logps_and_entropies(
                trainer, trainer.model, batch[row : row + 1], mask[row : row + 1], 6
            )[0]
            torch.testing.assert_close(together[row : row + 1], alone, rtol=1e-5, atol=1e-6)
    # And α matters: the adapter trained, so two α give two different log-probs.
    set_preference(trainer.model, Preference(torch.tensor([1.0, 0.0]), ("vowels", "short")))
    with torch.no_grad():
        a = trainer.model(batch).logits
        set_preference(trainer.model, Preference(torch.tensor([0.0, 1.0]), ("vowels", "short")))
        b = trainer.model(batch).logits
    assert not torch.allclose(a, b)


def test_prompt_shared_scores_equal_full_rows(tiny_lm):
    from align.rewards import arm_rewards

    model, tokenizer = tiny_lm
    questions = ["How was the trip?", "How was the trip?", "Did you like the film?", "Hi"]
    answers = ["Great, thanks!", "Awful.", "Yes :)", "Hello there, how are you today?"]
    shared = prompt_shared_log_probs(model, tokenizer, questions, answers, batch_size=2)
    full = arm_rewards(model, tokenizer, questions, answers, max_length=1024, max_prompt_length=256)
    torch.testing.assert_close(shared, full.float(), rtol=1e-4, atol=1e-4)
    # A PARM: each row at its own α, its prompt read once per distinct (prompt, α).
    config = PBLoraConfig(objectives=["a", "b"], r1=2, r2=2, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(0)
    parm = get_peft_model(copy.deepcopy(model), config).eval()
    for layer in parm.base_model.preference_layers():  # B starts at 0: make the adapter act
        for weight in layer._output_factor.values():
            torch.nn.init.normal_(weight.weight, std=0.5)
    pref = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    shared = prompt_shared_log_probs(parm, tokenizer, questions, answers, pref=pref)
    full = arm_rewards(parm, tokenizer, questions, answers, max_length=1024, pref=pref)
    torch.testing.assert_close(shared, full.float(), rtol=1e-4, atol=1e-4)
    at_a = prompt_shared_log_probs(parm, tokenizer, questions, answers, pref=pref[[0, 0, 0, 0]])
    assert not torch.allclose(at_a, shared)


def test_arm_and_parm_folders_serve_as_rewards(tmp_path, tiny_lm):
    from align.rewards import arm_rewards

    model, tokenizer = tiny_lm
    base = tmp_path / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    torch.manual_seed(0)
    parm = get_peft_model(
        copy.deepcopy(model),
        PBLoraConfig(objectives=["vowels", "short"], r1=2, r2=2, target_modules=["q_proj"]),
    )
    for layer in parm.base_model.preference_layers():
        for weight in layer._output_factor.values():
            torch.nn.init.normal_(weight.weight, std=0.5)
    parm.eval().save_pretrained(tmp_path / "parm")
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "arm")
    functions = objective_rewards(
        ["vowels", "short"],
        {"vowels": f"parm:{tmp_path / 'parm'}", "short": f"parm:{tmp_path / 'parm'}"},
        base=str(base),
    )
    assert [f.__name__ for f in functions] == ["vowels", "short"]
    questions, answers = ["How was it?"] * 2, ["Fine.", "It was a long and lovely day."]
    values = [f(prompts=questions, completions=answers) for f in functions]
    for index, f_values in enumerate(values):
        vertex = torch.eye(2, dtype=torch.float64)[index]
        expected = arm_rewards(parm, tokenizer, questions, answers, max_length=1024, pref=vertex)
        assert f_values == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-4)
    assert values[0] != values[1]
    (arm,) = objective_rewards(["vowels"], [f"arm:{tmp_path / 'arm'}"], base=str(base))
    assert len(arm(prompts=questions, completions=answers)) == 2
    # A sequence-classification reward model: its score, on the trainer's device.
    from align.scorers import get_scorer
    from align.testing import tiny_reward_model

    classifier, classifier_tokenizer = tiny_reward_model()
    classifier.save_pretrained(tmp_path / "rm")
    classifier_tokenizer.save_pretrained(tmp_path / "rm")
    (rm,) = objective_rewards(
        ["vowels"], {"vowels": f"reward-model:{tmp_path / 'rm'}"}, device="cpu"
    )
    expected = get_scorer(f"reward-model:{tmp_path / 'rm'}").score(questions, answers)
    assert rm(prompts=questions, completions=answers) == pytest.approx(expected.tolist(), rel=1e-5)
    with pytest.raises(
        ValueError, match=re.escape("has objectives ['vowels', 'short'], not 'helpful'")
    ):
        objective_rewards(["helpful"], [f"parm:{tmp_path / 'parm'}"], base=str(base))


def test_bad_input_gets_one_clear_error(tmp_path, tiny_lm):
    model, tokenizer = tiny_lm

    def build(rewards=None, **options):
        return MOGRPOTrainer(
            copy.deepcopy(model),
            rewards if rewards is not None else {"vowels": vowels, "short": shortness},
            args=MOGRPOConfig(output_dir=str(tmp_path / "bad"), **{**COMMON, **options}),
            train_dataset=prompts(),
            processing_class=tokenizer,
        )

    with pytest.raises(ValueError, match=r"no reward for \['short'\]"):
        build({"vowels": vowels}, objectives=["vowels", "short"])
    with pytest.raises(ValueError, match=r"rewards for unknown objectives \['tone'\]"):
        build(
            {"vowels": vowels, "short": shortness, "tone": vowels}, objectives=["vowels", "short"]
        )
    with pytest.raises(ValueError, match="reward of 'vowels': unknown scorer 'positivty'"):
        build({"vowels": "positivty", "short": "brevity"})
    with pytest.raises(ValueError, match=r"needs 2 weights .* got shape \(1,\)"):
        build(preference=[1.0])
    with pytest.raises(ValueError, match="aggregator 'mgda' ignores α"):
        build(policy_adapter="pblora", mode="per_objective", aggregator="mgda")
    with pytest.raises(ValueError, match="reward_weights is TRL's static weighting"):
        build(reward_weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="mode must be one of"):
        build(mode="pareto")
    with pytest.raises(ValueError, match="needs a loss history"):
        build(scalarization="tchebycheff", scalarization_options={"ideal": "running"})
    with pytest.raises(ValueError, match="cannot import"):
        build({"vowels": "python:no_such_module:f", "short": shortness})


def test_tchebycheff_scalarisation_scores_each_completion_by_its_worst_weighted_objective(
    tmp_path, lora_policy
):
    policy, tokenizer = lora_policy
    trainer = run_align(
        policy, tokenizer, tmp_path, "tch", scalarization="tchebycheff", preference=[0.5, 0.5]
    )
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    z = torch.nan_to_num(
        (rewards - rewards.mean(0)) / (rewards.std(0, unbiased=False) + 1e-4), nan=0.0
    )
    scores = [float(-trainer.scalarizer(-z[i], torch.tensor([0.5, 0.5]))) for i in range(4)]
    # -max_i α_i (0 - z_i) = min_i α_i z_i: only the worst weighted objective counts, so the
    # both-good completion is best and one bad objective is as bad as two.
    assert scores == pytest.approx((0.5 * z).min(dim=1).values.tolist())
    assert scores[2] > scores[0] == scores[1] == scores[3]
    assert logged(trainer, "loss")
    # Smooth Tchebycheff: a soft minimum, so one bad objective is better than two.
    smooth = run_align(
        policy,
        tokenizer,
        tmp_path,
        "stch",
        scalarization="smooth_tchebycheff",
        preference=[0.5, 0.5],
    )
    soft = [float(-smooth.scalarizer(-z[i], torch.tensor([0.5, 0.5]))) for i in range(4)]
    assert soft[2] > soft[0] > soft[3]
    assert soft[0] == pytest.approx(soft[1])


# ------------------------------------------------------------------- processes and resume
REPO = Path(__file__).resolve().parents[1]
RUN_SCRIPT = REPO / "tests" / "distributed" / "grpo_run.py"


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "TRL_EXPERIMENTAL_SILENCE": "1",
        # The recipes' python: rewards (vowels, shortness) live beside the launch script.
        "PYTHONPATH": str(RUN_SCRIPT.parent),
    }


@pytest.fixture()
def tiny_model_dir(tmp_path, tiny_lm):
    model, tokenizer = tiny_lm
    path = tmp_path / "tiny-model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory, tiny_lm):
    """The linear and MGDA runs on one process with the whole batch (the reference)."""
    folder = tmp_path_factory.mktemp("grpo-one")
    model, tokenizer = tiny_lm
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    out = folder / "one.pt"
    command = [sys.executable, str(RUN_SCRIPT), str(folder / "model"), str(out), "--batch", "8"]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "model", torch.load(out)


@pytest.mark.multiprocess
@pytest.mark.parametrize("config", ["cpu_2proc.yaml", "deepspeed_zero2_cpu.yaml"])
def test_two_processes_give_the_one_process_update_on_the_same_global_batch(
    tmp_path, one_process_runs, config
):
    """Scalarised (linear) and per-objective MGDA (the Gram of the all-reduced gradients; ZeRO-2:
    of the shards' Grams) after two steps of 2 × 4 completions equal one process's 8."""
    model_dir, reference = one_process_runs
    out = tmp_path / "two.pt"
    env = _env()
    if "deepspeed" not in config:
        env["ACCELERATE_USE_CPU"] = "1"  # else `accelerate launch` starts one process
    result = accelerate_launch(
        REPO / "accelerate_configs" / config,
        *(str(RUN_SCRIPT), str(model_dir), str(out), "--batch", "4"),
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    got = torch.load(out)
    assert got["world_size"] == 2
    assert got["distributed_type"].endswith("DEEPSPEED" if "deepspeed" in config else "MULTI_CPU")
    initial = {
        n: p.detach()
        for n, p in get_peft_model(
            AutoModelForCausalLM.from_pretrained(model_dir),
            LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        ).named_parameters()
        if p.requires_grad
    }
    for run in ("linear", "mgda"):
        expected, have = reference["runs"][run], got["runs"][run]
        assert expected.keys() == have.keys()
        moved = max(
            float((expected[n] - initial[n]).abs().max()) for n in expected if "lora_B" in n
        )
        assert moved > 1e-3, "the steps must move the adapter for the comparison to mean much"
        for name in expected:
            torch.testing.assert_close(have[name], expected[name], rtol=1e-4, atol=2e-5)
    linear, mgda = reference["runs"]["linear"], reference["runs"]["mgda"]
    assert max(float((linear[n] - mgda[n]).abs().max()) for n in linear) > 1e-4


def _write_recipe(tmp_path: Path, model_dir: Path, **args) -> Path:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"How was day {i}?"}) + "\n" for i in range(12)))
    recipe = {
        "trainer": "mo_grpo",
        "model": str(model_dir),
        "data": {"path": str(data)},
        "args": {
            "output_dir": str(tmp_path / "run"),
            "rewards": {"vowels": "python:grpo_run:vowels", "short": "python:grpo_run:shortness"},
            "policy_adapter": "pblora",
            "adapter_rank": 2,
            "preference_rank": 2,
            "target_modules": ["q_proj", "v_proj"],
            "per_device_train_batch_size": 8,
            "num_generations": 4,
            "max_completion_length": 8,
            "learning_rate": 5e-3,
            "lr_scheduler_type": "constant",
            "logging_steps": 1,
            "activation_checkpointing": False,
            "use_cpu": True,
            "bf16": False,
            "report_to": "none",
            "seed": 1,
            **args,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))  # rewards in α order
    return path


def _train(recipe: Path, *overrides: str) -> list[str]:
    command = [sys.executable, "-m", "align.train", str(recipe)]
    for item in overrides:
        command += ["--set", item]
    return command


def test_a_killed_run_resumes_to_the_uninterrupted_runs_adapter(tmp_path, tiny_model_dir):
    """α per group, sampling and the adapter all resume: a PBLoRA policy killed after its
    step-4 checkpoint ends, resumed, where the uninterrupted run ends."""
    from safetensors.torch import load_file

    recipe = _write_recipe(tmp_path, tiny_model_dir, max_steps=6, save_steps=2)
    uninterrupted = tmp_path / "uninterrupted"
    subprocess.run(
        _train(recipe, f"args.output_dir={uninterrupted}"),
        check=True,
        env=_env(),
        capture_output=True,
        timeout=600,
    )
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _train(recipe, f"args.output_dir={killed}"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while not (killed / "checkpoint-4").exists() and process.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(
        _train(recipe, f"args.output_dir={killed}"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    expected = load_file(uninterrupted / "final" / "adapter_model.safetensors")
    got = load_file(killed / "final" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    info = json.loads((killed / "final" / "align_training.json").read_text())
    assert info["objectives"] == ["vowels", "short"] and info["conditioned"]
    # The adapter answers any α afterwards: loaded by PEFT, steered per row.
    from peft import PeftModel

    import align.adapters  # noqa: F401

    policy = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), killed / "final"
    ).eval()
    ids = torch.randint(3, 200, (2, 6))
    with torch.no_grad():
        rows = policy(ids, pref=torch.tensor([[1.0, 0.0], [0.0, 1.0]])).logits
    assert not torch.allclose(rows[0], rows[1])


def test_runs_trained_at_one_fixed_alpha_are_a_sweep_route(tmp_path):
    """``kind: merged`` with ``checkpoints:`` takes policies trained per α (their training
    record's α), and says so when a folder records none."""
    from align.rewards.arm import TRAINING_INFO
    from align.sweep.routes import MergedRoute

    folders = []
    for weights in ([1.0, 0.0], [0.5, 0.5], [0.0, 1.0]):
        folder = tmp_path / f"run-{weights[0]}"
        folder.mkdir()
        record = {
            "objectives": ["positive", "brief"],
            "preference": dict(zip(["positive", "brief"], weights)),
        }
        (folder / TRAINING_INFO).write_text(json.dumps(record))
        folders.append(str(folder))
    route = MergedRoute("per α", ["positive", "brief"], {}, checkpoints=folders)
    assert sorted(route.by_alpha) == [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]
    assert route.by_alpha[(0.5, 0.5)] == folders[1]
    (Path(folders[0]) / TRAINING_INFO).write_text(json.dumps({"objectives": ["positive", "brief"]}))
    with pytest.raises(ValueError, match="has no align_merge.json and no fixed α"):
        MergedRoute("per α", ["positive", "brief"], {}, checkpoints=folders)


def _random_parm(model, folder: Path, objectives=("vowels", "short")) -> Path:
    torch.manual_seed(0)
    parm = get_peft_model(
        copy.deepcopy(model),
        PBLoraConfig(objectives=list(objectives), r1=2, r2=2, target_modules=["q_proj"]),
    )
    for layer in parm.base_model.preference_layers():  # B starts at 0: make the adapter act
        for weight in layer._output_factor.values():
            torch.nn.init.normal_(weight.weight, std=0.5)
    parm.eval().save_pretrained(folder)
    return folder


def test_a_parm_as_one_combined_reward_scores_each_row_at_its_own_alpha(tmp_path, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    parm = _random_parm(model, tmp_path / "parm")
    args = MOGRPOConfig(
        output_dir=str(tmp_path / "c"),
        combined_reward=f"parm:{parm}",
        policy_adapter="pblora",
        adapter_rank=2,
        preference_rank=2,
        **{**COMMON, "max_steps": 1},
    )
    trainer = MOGRPOTrainer(
        model, None, args=args, train_dataset=prompts(), processing_class=tokenizer
    )
    assert trainer.objectives == ("vowels", "short")  # the PARM's
    calls = []
    original = trainer.combined.parm.scores

    def spy(questions, answers, pref=None):
        values = original(questions, answers, pref=pref)
        calls.append((pref.clone(), values))
        return values

    trainer.combined.parm.scores = spy
    trainer.train()
    (pref, values), *_ = calls
    assert pref.shape == (8, 2) and not torch.equal(pref[0], pref[4])  # each group its own α
    assert logged(trainer, "rewards/combined/mean")[0] == pytest.approx(
        values.mean().item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="objective names disagree"):
        MOGRPOTrainer(
            model,
            None,
            args=MOGRPOConfig(
                output_dir=str(tmp_path / "d"),
                combined_reward=f"parm:{parm}",
                objectives=["helpful", "harmless"],
                **COMMON,
            ),
            train_dataset=prompts(),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="needs mode: scalarized"):
        MOGRPOTrainer(
            model,
            None,
            args=MOGRPOConfig(
                output_dir=str(tmp_path / "e"),
                combined_reward=f"parm:{parm}",
                mode="per_objective",
                **COMMON,
            ),
            train_dataset=prompts(),
            processing_class=tokenizer,
        )


@pytest.mark.parametrize(
    "name, objectives",
    [
        ("mo_grpo_cpu.yaml", ["positive", "brief"]),
        ("mo_grpo_pku_saferlhf.yaml", ["helpful", "harmless"]),
    ],
)
def test_the_shipped_recipes_are_valid_configs(name, objectives):
    from align.config import build_training_args
    from align.train import load_recipe

    recipe = load_recipe(REPO / "recipes" / name, ["args.use_vllm=false", "args.bf16=false"])
    args = build_training_args(MOGRPOConfig, recipe["args"], "recipe 'args'", "args.{}")
    assert list(args.rewards) == objectives  # in α order


def test_the_cpu_recipe_trains_the_embedded_model(tmp_path):
    """One step of recipes/mo_grpo_cpu.yaml on the embedded SmolLM2 (real scorers as rewards):
    an α-conditioned PBLoRA policy, written with its training record and held-out prompts."""
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "align.train",
        str(REPO / "recipes" / "mo_grpo_cpu.yaml"),
        "--set",
        f"args.output_dir={out}",
        "--set",
        "args.max_steps=1",
        "--set",
        "args.max_completion_length=12",
        "--set",
        "data.test_size=4",
    ]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((out / "final" / "align_training.json").read_text())
    assert info["rewards"] == {"positive": "positivity", "brief": "brevity ['max_tokens']"}
    assert info["conditioned"] and info["objectives"] == ["positive", "brief"]
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PBLORA" and config["objectives"] == ["positive", "brief"]
    held_out = (out / "held_out_prompts.jsonl").read_text().splitlines()
    assert len(held_out) == 4


def test_an_aggregator_that_learns_parameters_gets_them_optimised(tmp_path, lora_policy):
    """Uncertainty weighting's log-variances join the optimizer (no weight decay) and move."""
    policy, tokenizer = lora_policy
    trainer = run_align(
        policy,
        tokenizer,
        tmp_path,
        "uw",
        mode="per_objective",
        aggregator="uncertainty",
        preference=[0.5, 0.5],
    )
    extra = list(trainer.engine.aggregator.parameters())
    assert extra
    groups = [g for g in trainer.optimizer.param_groups if any(p is extra[0] for p in g["params"])]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    assert float(extra[0].detach().abs().max()) > 0  # they start at 0
