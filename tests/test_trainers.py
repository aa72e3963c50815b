"""ARM / PARM / preference-DPO trainers: losses against their definitions and against TRL,
learning on a small problem, recipes, resume after a kill."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from launching import accelerate_launch
from peft import get_peft_model

from align.adapters import PBLoraConfig, SVDLoraConfig, merge_at_preference, set_preference
from align.data import make_preference_dataset, save_preference_dataset
from align.rewards import arm_rewards, reward_settings
from align.testing import tiny_causal_lm
from align.trainers import (
    ARMConfig,
    ARMTrainer,
    PARMConfig,
    PARMTrainer,
    PreferenceDPOConfig,
    PreferenceDPOTrainer,
)

REPO = Path(__file__).resolve().parents[1]
CPU_ARGS = dict(
    bf16=False,
    activation_checkpointing=False,
    use_cpu=True,
    report_to="none",
    save_strategy="no",
    disable_dropout=True,
    max_length=96,
    max_prompt_length=32,
    logging_steps=1,
)

# Markers that are two tokens each in the tiny tokenizer (a 512-token BPE), so the two answers
# of a pair have the same length and differ in exactly two tokens.
POSITIVE = [":)", ":D"]
NEGATIVE = [":(", ":/"]
FORMAL = ["Sir"]
CASUAL = ["yo"]
QUESTIONS = [
    "How was the trip?",
    "What do you think of the plan?",
    "How is the weather today?",
    "Did you like the film?",
    "How was dinner?",
    "What about the new park?",
]


def positive_formal_pairs(n: int, seed: int):
    """Pairs whose two objectives are independent: one prefers the happy face, the other the
    formal address."""
    rng = random.Random(seed)
    prompts, first, second, positive, formal = [], [], [], [], []
    for _ in range(n):
        good, bad = rng.choice(POSITIVE), rng.choice(NEGATIVE)
        polite, rough = rng.choice(FORMAL), rng.choice(CASUAL)
        pos_with_formal = rng.random() < 0.5  # which answer gets the formal opener
        answer_a = f"{polite if pos_with_formal else rough} {good}"
        answer_b = f"{rough if pos_with_formal else polite} {bad}"
        swap = rng.random() < 0.5
        prompts.append(rng.choice(QUESTIONS))
        first.append(answer_b if swap else answer_a)
        second.append(answer_a if swap else answer_b)
        a_index = 1 if swap else 0
        positive.append(a_index)
        formal.append(a_index if pos_with_formal else 1 - a_index)
    return make_preference_dataset(prompts, first, second, {"positive": positive, "formal": formal})


@pytest.fixture()
def tiny():
    return tiny_causal_lm(seed=0)


def random_pblora(model):
    """A PBLoRA on a copy of ``model`` with B drawn non-zero (so Θ gets gradients at once)."""
    return get_peft_model(
        copy.deepcopy(model),
        PBLoraConfig(objectives=["positive", "formal"], init_weights=False, lora_dropout=0.0),
    )


def one_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def test_parm_loss_at_a_vertex_is_the_arm_loss_of_that_objective(tmp_path, tiny):
    model, tokenizer = tiny
    pairs = positive_formal_pairs(8, seed=1)
    peft_model = random_pblora(model)
    for index, objective in enumerate(("positive", "formal")):
        vertex = torch.eye(2)[index]

        class AtVertex(PARMTrainer):
            def training_preference(self, vertex=vertex):
                return vertex

        parm = AtVertex(
            peft_model,
            PARMConfig(
                output_dir=str(tmp_path / "parm"),
                per_device_train_batch_size=8,
                beta=0.1,
                **CPU_ARGS,
            ),
            pairs,
            processing_class=tokenizer,
        )
        parm.model.train()
        batch = one_batch(parm)
        parm_loss = parm.compute_loss(parm.model, batch)
        # The ARM: the PBLoRA folded into plain weights at the vertex, trained for one objective.
        merged = merge_at_preference(copy.deepcopy(peft_model), vertex)
        arm = ARMTrainer(
            merged,
            ARMConfig(
                output_dir=str(tmp_path / "arm"),
                per_device_train_batch_size=8,
                beta=0.1,
                objectives=[objective],
                **CPU_ARGS,
            ),
            pairs,
            processing_class=tokenizer,
        )
        arm.model.train()
        arm_loss = arm.compute_loss(arm.model, one_batch(arm))
        assert parm_loss.item() > 0
        torch.testing.assert_close(parm_loss, arm_loss, rtol=1e-5, atol=1e-6)


def test_preference_dpo_with_one_objective_is_trls_dpo_loss(tmp_path, tiny):
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = tiny
    pairs = positive_formal_pairs(8, seed=2)
    # All labels 0: response_0 is the chosen one, so the two trainers see the same batch.
    pairs = pairs.map(lambda row: {"preferred_positive": 0}).remove_columns("preferred_formal")
    policy = get_peft_model(
        copy.deepcopy(model),
        SVDLoraConfig(objectives=["positive"], init_weights=False, lora_dropout=0.0),
    )
    set_preference(policy, [1.0])
    ours = PreferenceDPOTrainer(
        copy.deepcopy(policy),
        PreferenceDPOConfig(
            output_dir=str(tmp_path / "ours"), per_device_train_batch_size=8, beta=0.1, **CPU_ARGS
        ),
        pairs,
        processing_class=tokenizer,
    )
    ours.model.train()
    batch = one_batch(ours)
    our_loss = ours.compute_loss(ours.model, batch)

    trl_pairs = pairs.rename_columns({"response_0": "chosen", "response_1": "rejected"})
    trl_args = {k: v for k, v in CPU_ARGS.items() if k != "max_prompt_length"}
    theirs = DPOTrainer(
        copy.deepcopy(policy),
        ref_model=copy.deepcopy(model),  # the reference is the base model, as in ours
        args=DPOConfig(
            output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, beta=0.1, **trl_args
        ),
        train_dataset=trl_pairs.remove_columns("preferred_positive"),
        processing_class=tokenizer,
    )
    theirs.model.train()
    trl_batch = {k: v for k, v in batch.items() if k != "preferred"}
    trl_loss = theirs.compute_loss(theirs.model, trl_batch)
    assert our_loss.item() > 0
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-6)


def vertex_accuracy(model, tokenizer, pairs, objective_index):
    """Share of decided pairs the model orders like objective ``objective_index`` at its vertex."""
    objective = ["positive", "formal"][objective_index]
    vertex = torch.eye(2)[objective_index]
    r0 = arm_rewards(model, tokenizer, pairs["prompt"], pairs["response_0"], pref=vertex)
    r1 = arm_rewards(model, tokenizer, pairs["prompt"], pairs["response_1"], pref=vertex)
    labels = torch.tensor(pairs[f"preferred_{objective}"])
    predicted = (r1 > r0).long()
    return (predicted == labels).float().mean().item()


def test_a_trained_tiny_parm_orders_held_out_pairs_for_each_objective_at_its_vertex(tmp_path):
    model, tokenizer = tiny_causal_lm(seed=0)
    train, held_out = positive_formal_pairs(192, seed=3), positive_formal_pairs(64, seed=4)
    trainer = PARMTrainer(
        model,
        PARMConfig(
            output_dir=str(tmp_path / "parm"),
            per_device_train_batch_size=16,
            max_steps=40,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            beta=1.0,
            lora_dropout=0.0,
            **CPU_ARGS,
        ),
        train,
        processing_class=tokenizer,
    )
    before = [vertex_accuracy(trainer.model, tokenizer, held_out, i) for i in range(2)]
    trainer.train()
    trainer.model.eval()
    after = [vertex_accuracy(trainer.model, tokenizer, held_out, i) for i in range(2)]
    # The objectives are independent, so one ordering cannot serve both: above ~0.75 on each
    # needs α to steer the reward.
    for objective, acc_before, acc_after in zip(("positive", "formal"), before, after):
        assert acc_after >= 0.85, (objective, before, after)
        assert acc_after > acc_before, (objective, before, after)


# ------------------------------------------------------------------------------ recipes
def write_recipe(tmp_path: Path, model_dir: Path, **args) -> Path:
    # No ties: every objective averages over the same pairs however the batch is split.
    data = save_preference_dataset(positive_formal_pairs(16, seed=6), tmp_path / "pairs.jsonl")
    recipe = {
        "trainer": "parm",
        "model": str(model_dir),
        "data": {"path": str(data)},
        "args": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 4,
            "per_device_train_batch_size": 2,
            "beta": 0.5,
            "learning_rate": 5e-3,
            "lr_scheduler_type": "constant",
            "lora_dropout": 0.0,
            "max_length": 96,
            "max_prompt_length": 32,
            "logging_steps": 1,
            "save_steps": 2,
            "bf16": False,
            "activation_checkpointing": False,
            "use_cpu": True,
            "report_to": "none",
            "seed": 0,
            **args,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture()
def tiny_model_dir(tmp_path, tiny):
    model, tokenizer = tiny
    path = tmp_path / "tiny-model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_recipe_errors_name_the_field(tmp_path, tiny_model_dir):
    from align.train import RecipeError, load_recipe

    path = write_recipe(tmp_path, tiny_model_dir)
    with pytest.raises(RecipeError, match="'trainer': unknown trainer 'ppo'; available: arm, dpo"):
        load_recipe(path, ["trainer=ppo"])
    with pytest.raises(RecipeError, match="unknown recipe fields"):
        load_recipe(path, ["modle=x"])
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    from align.train import build_trainer

    with pytest.raises(
        RecipeError, match=r"unknown recipe 'args' \(PARMConfig\) fields \['not_a_field'\]"
    ):
        build_trainer(load_recipe(path, ["args.not_a_field=1"]))
    with pytest.raises(RecipeError, match=r"\['learning_rat'\]; did you mean \['learning_rate'"):
        build_trainer(load_recipe(path, ["args.learning_rat=1"]))
    # PyYAML reads 2e-3 as a string; a recipe means the number.
    assert load_recipe(path, ["args.learning_rate=2e-3"])["args"]["learning_rate"] == 0.002


def test_arm_trainer_refuses_several_objectives_and_parm_refuses_a_mismatched_adapter(
    tmp_path, tiny
):
    model, tokenizer = tiny
    pairs = positive_formal_pairs(4, seed=5)
    with pytest.raises(ValueError, match="trains one objective"):
        ARMTrainer(
            copy.deepcopy(model),
            ARMConfig(output_dir=str(tmp_path), **CPU_ARGS),
            pairs,
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="not in the dataset"):
        PARMTrainer(
            copy.deepcopy(model),
            PARMConfig(output_dir=str(tmp_path), objectives=["helpful"], **CPU_ARGS),
            pairs,
            processing_class=tokenizer,
        )
    swapped = get_peft_model(copy.deepcopy(model), PBLoraConfig(objectives=["formal", "positive"]))
    with pytest.raises(ValueError, match="objective names disagree"):
        PARMTrainer(
            swapped,
            PARMConfig(output_dir=str(tmp_path), **CPU_ARGS),
            pairs,
            processing_class=tokenizer,
        )


def _train_command(recipe: Path, *overrides: str) -> list[str]:
    command = [sys.executable, "-m", "align.train", str(recipe)]
    for item in overrides:
        command += ["--set", item]
    return command


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }


def _final_adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "final" / "adapter_model.safetensors")


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_adapter(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir, max_steps=6, save_steps=2)
    uninterrupted = tmp_path / "uninterrupted"
    subprocess.run(
        _train_command(recipe, f"args.output_dir={uninterrupted}"),
        check=True,
        env=_env(),
        capture_output=True,
        timeout=600,
    )
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _train_command(recipe, f"args.output_dir={killed}"),
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
        _train_command(recipe, f"args.output_dir={killed}"),
        check=True,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "resuming from" in resumed.stdout
    expected, got = _final_adapter(uninterrupted), _final_adapter(killed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    info = json.loads((killed / "final" / "align_training.json").read_text())
    assert info["objectives"] == ["positive", "formal"]


def _logged_losses(run: Path, steps: int) -> list[float]:
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry][:steps]


def _launch(
    config: str,
    recipe: Path,
    output_dir: Path,
    *overrides: str,
    script: list[str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """``accelerate launch`` two processes of ``align.train`` (or of ``script``, a file in
    tests/distributed/ and its arguments, which runs align.train itself)."""
    program = ["-m", "align.train"]
    if script is not None:
        program = [str(REPO / "tests" / "distributed" / script[0]), *script[1:]]
    result = accelerate_launch(
        REPO / "accelerate_configs" / config,
        *(*program, str(recipe), "--set", f"args.output_dir={output_dir}", *overrides),
        env=_env(),
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.multiprocess
def test_a_zero2_gml2o_run_killed_while_saving_resumes_to_the_same_adapter(
    tmp_path, tiny_model_dir
):
    """GML2O under two-process ZeRO-2 keeps its recurrent state per rank (each rank's gradient
    partition): a checkpoint holds one state file per rank; a run killed while it writes a
    checkpoint resumes from the one before and ends with the uninterrupted run's adapter and
    state; a resume on another world size is refused."""
    from align.trainers.base import MOGRAD_SHARD_STATE, MOGRAD_STATE

    recipe = write_recipe(
        tmp_path,
        tiny_model_dir,
        max_steps=4,
        save_steps=2,
        aggregator="gml2o",
        allow_preference_blind_aggregator=True,  # PARM refuses α-blind methods otherwise
    )
    uninterrupted = tmp_path / "uninterrupted"
    _launch("deepspeed_zero2_cpu.yaml", recipe, uninterrupted)
    files = [MOGRAD_SHARD_STATE.format(rank=rank) for rank in (0, 1)]
    for step in (2, 4):
        checkpoint = uninterrupted / f"checkpoint-{step}"
        assert all((checkpoint / name).is_file() for name in files), sorted(checkpoint.iterdir())
        assert not (checkpoint / MOGRAD_STATE).exists()
    # A run killed (SIGKILL, rank 1) half-way through writing checkpoint-4's files: the partial
    # checkpoint is never picked up, and the run resumes from checkpoint-2.
    resumed = tmp_path / "resumed"
    killed = _launch(
        "deepspeed_zero2_cpu.yaml",
        recipe,
        resumed,
        script=["kill_during_save.py", "checkpoint-4"],
        check=False,
    )
    assert killed.returncode != 0, "the run was not killed"
    assert not (resumed / "final").exists() and not (resumed / "checkpoint-4").exists()
    partial = resumed / ".checkpoint-4.partial"
    assert any(path.is_file() for path in partial.rglob("*")), "killed before writing anything"
    log = _launch("deepspeed_zero2_cpu.yaml", recipe, resumed).stdout
    assert f"resuming from {resumed / 'checkpoint-2'}" in log
    assert not partial.exists()
    expected, got = _final_adapter(uninterrupted), _final_adapter(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    # The state itself went on from the checkpoint (a fresh one would count 2 steps, not 4).
    for name in files:
        want = torch.load(uninterrupted / "checkpoint-4" / name, weights_only=True)
        have = torch.load(resumed / "checkpoint-4" / name, weights_only=True)
        assert have["shard"] == want["shard"]
        assert int(want["aggregator"]["steps"]) == 4
        for key, value in want["aggregator"].items():
            torch.testing.assert_close(have["aggregator"][key], value, rtol=0, atol=0)
    # One process cannot take up rank 0's partition of a two-process run.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-2", alone / "checkpoint-2")
    result = subprocess.run(
        _train_command(recipe, f"args.output_dir={alone}"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "resume with the same world size" in result.stderr, result.stderr[-3000:]


@pytest.mark.multiprocess
@pytest.mark.parametrize("config", ["cpu_2proc.yaml", "deepspeed_zero2_cpu.yaml"])
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path, tiny_model_dir, config):
    # One process with 4 pairs per step vs two processes with 2 each: the same global batches.
    recipe = write_recipe(tmp_path, tiny_model_dir, max_steps=4, save_steps=4)
    single = tmp_path / "single"
    subprocess.run(
        _train_command(recipe, f"args.output_dir={single}", "args.per_device_train_batch_size=4"),
        check=True,
        env=_env(),
        capture_output=True,
        timeout=600,
    )
    distributed = tmp_path / "distributed"
    launch = _launch(config, recipe, distributed, "--set", "args.per_device_train_batch_size=2")
    # DDP is not asked to search for unused parameters (an autograd traversal every step).
    assert "find_unused_parameters=True" not in launch.stderr
    if "deepspeed" in config:
        # DeepSpeed really ran (not a plain multi-CPU run under its name): its checkpoint layout.
        assert list((distributed / "checkpoint-4").glob("global_step*")), "no DeepSpeed checkpoint"
    expected, got = _logged_losses(single, 3), _logged_losses(distributed, 3)
    assert len(expected) == len(got) == 3
    assert expected == pytest.approx(got, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(
    "aggregator, options",
    [("smooth_tchebycheff", {}), ("mgda", {}), ("mgda", {"feature_level": True}), ("dwa", {})],
)
def test_parm_trains_with_any_kind_of_aggregator(tmp_path, tiny, aggregator, options):
    model, tokenizer = tiny
    trainer = PARMTrainer(
        copy.deepcopy(model),
        PARMConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            max_steps=3,
            aggregator=aggregator,
            beta=1.0,
            allow_preference_blind_aggregator=aggregator in ("mgda", "dwa"),
            **options,
            **CPU_ARGS,
        ),
        positive_formal_pairs(12, seed=7),
        processing_class=tokenizer,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        weights = [entry["weight/positive"], entry["weight/formal"]]
        assert all(torch.isfinite(torch.tensor(weights))), entry
    moved = [
        n
        for n, p in trainer.model.named_parameters()
        if n in before and not torch.equal(p.detach(), before[n])
    ]
    assert moved, "no adapter parameter changed"


def test_length_normalize_scores_a_response_by_its_mean_token_log_prob(tmp_path, tiny):
    model, tokenizer = tiny
    pairs = positive_formal_pairs(4, seed=2)

    def scores(normalize: bool) -> torch.Tensor:
        arm = ARMTrainer(
            copy.deepcopy(model),
            ARMConfig(
                output_dir=str(tmp_path / f"arm-{normalize}"),
                per_device_train_batch_size=4,
                objectives=["positive"],
                length_normalize=normalize,
                lora_dropout=0.0,
                **CPU_ARGS,
            ),
            pairs,
            processing_class=tokenizer,
        )
        arm.model.eval()
        batch = one_batch(arm)
        with torch.no_grad():
            return arm.sequence_log_probs(arm.model, batch), batch

    summed, batch = scores(False)
    mean, _ = scores(True)
    tokens = batch["completion_mask"].sum(dim=1).to(summed)
    torch.testing.assert_close(mean, summed / tokens)
    assert not torch.allclose(mean, summed)  # the responses have several tokens


def test_the_training_record_says_how_to_recompute_the_rewards(tmp_path, tiny):
    """align_training.json stores every setting that changes a score; arm_rewards given them
    (reward_settings) reproduces the trainer's own scores, the defaults do not."""
    model, tokenizer = tiny
    pairs = positive_formal_pairs(4, seed=5)
    arm = ARMTrainer(
        copy.deepcopy(model),
        ARMConfig(
            output_dir=str(tmp_path / "arm"),
            per_device_train_batch_size=4,
            objectives=["positive"],
            lora_dropout=0.0,
            **{**CPU_ARGS, "max_length": 12, "max_prompt_length": 8, "length_normalize": True},
        ),
        pairs,
        processing_class=tokenizer,
    )
    arm.model.eval()
    final = arm.save_final(tmp_path / "arm" / "final")
    info = json.loads((final / "align_training.json").read_text())
    settings = reward_settings(final)
    expected = {"length_normalize": True, "max_length": 12, "max_prompt_length": 8}
    assert {key: info[key] for key in expected} == expected == settings
    with torch.no_grad():
        trained = torch.cat(arm.pair_scores(arm.model, one_batch(arm))).sort().values
    texts = pairs["prompt"][:] * 2, pairs["response_0"][:] + pairs["response_1"][:]
    recomputed = arm_rewards(arm.model, tokenizer, *texts, **settings).sort().values
    torch.testing.assert_close(recomputed, trained, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(arm_rewards(arm.model, tokenizer, *texts).sort().values, trained)
    assert reward_settings(tmp_path) == {  # no record: the trainers' defaults
        "length_normalize": False,
        "max_length": 1024,
        "max_prompt_length": 256,
    }


@pytest.mark.parametrize("kind", ["arm", "parm-per-pair"])
def test_a_shared_prompt_gives_the_scores_and_gradients_of_two_full_rows(tmp_path, tiny, kind):
    model, tokenizer = tiny
    pairs = positive_formal_pairs(4, seed=5)
    if kind == "arm":
        trainer = ARMTrainer(
            copy.deepcopy(model),
            ARMConfig(
                output_dir=str(tmp_path),
                per_device_train_batch_size=4,
                objectives=["positive"],
                lora_dropout=0.0,
                **CPU_ARGS,
            ),
            pairs,
            processing_class=tokenizer,
        )
        with torch.no_grad():  # LoRA's B starts at 0: make the adapter matter
            for name, param in trainer.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
    else:
        trainer = PARMTrainer(
            random_pblora(model),
            PARMConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, **CPU_ARGS),
            pairs,
            processing_class=tokenizer,
        )
        alphas = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.0, 1.0]])
        trainer.set_model_preference(trainer.model, torch.cat([alphas, alphas]))
    trainer.model.train()
    batch = one_batch(trainer)
    # The prompts differ in length: left padding of the shared prefix is exercised.
    assert len(set(batch["prefix_mask"].sum(dim=1).tolist())) > 1
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def scores_and_grads(share: bool):
        trainer.args.share_prompt = share
        scores = trainer.sequence_log_probs(trainer.model, batch)
        weights = torch.linspace(0.5, 1.5, scores.shape[0])  # every row's gradient counts
        grads = torch.autograd.grad((scores * weights).sum(), params)
        return scores.detach(), grads

    full, full_grads = scores_and_grads(False)
    shared, shared_grads = scores_and_grads(True)
    torch.testing.assert_close(shared, full, rtol=1e-4, atol=1e-4)
    for got, want in zip(shared_grads, full_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in full_grads)
    if kind != "arm":  # the per-row α is back on the 2B rows
        from align.adapters import get_preference

        assert len(get_preference(trainer.accelerator.unwrap_model(trainer.model))) == 8


def test_per_pair_preference_scores_and_weights_each_pair_at_its_own_alpha(tmp_path, tiny):
    model, tokenizer = tiny
    pairs = positive_formal_pairs(4, seed=3)
    peft_model = random_pblora(model)
    trainer = PARMTrainer(
        peft_model,
        PARMConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            beta=0.5,
            preference_sampling="pair",
            preference_concentration=1.0,
            **CPU_ARGS,
        ),
        pairs,
        processing_class=tokenizer,
    )
    trainer.model.train()
    batch = one_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    # The α the trainer drew for this micro-batch, one per pair (same seeded draw).
    trainer.preference_steps.restart()
    alphas = trainer.training_preference(pairs=4)
    assert not torch.allclose(alphas[0], alphas[1])
    # Reference: each pair alone, at its own α, through the batch-α path.
    preferred = batch["preferred"]
    terms, counts = torch.zeros(2), (preferred != -1).sum(dim=0)
    for row in range(4):
        single = {
            k: torch.cat([v[row : row + 1], v[4 + row : 5 + row]])
            if v.shape[0] == 8
            else v[row : row + 1]
            for k, v in batch.items()
            if torch.is_tensor(v)
        }
        trainer.set_model_preference(trainer.model, alphas[row])
        scores = trainer.pair_scores(trainer.model, single)
        per_pair, _, n = trainer.objective_losses(*scores, single["preferred"])
        terms += (alphas[row] * per_pair * n).detach()
    expected = (terms / counts.clamp(min=1)).sum()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="linear scalarization"):
        PARMConfig(
            output_dir=str(tmp_path), preference_sampling="pair", aggregator="mgda", **CPU_ARGS
        )


def test_alpha_path_lr_ratio_gives_theta_its_own_learning_rate(tmp_path, tiny):
    model, tokenizer = tiny
    lr, ratio = 1e-3, 10.0
    # B starts non-zero: with B = 0, Θ gets no gradient on the first step.
    peft_model = random_pblora(model)
    trainer = PARMTrainer(
        peft_model,
        PARMConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            max_steps=1,
            learning_rate=lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            beta=1.0,
            alpha_path_lr_ratio=ratio,
            **CPU_ARGS,
        ),
        positive_formal_pairs(8, seed=4),
        processing_class=tokenizer,
    )
    named = dict(trainer.model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items() if p.requires_grad}
    trainer.train()
    groups = trainer.optimizer.param_groups
    theta_ids = {id(p) for n, p in named.items() if n.endswith(".theta")}
    for group in groups:
        in_group = {id(p) for p in group["params"]}
        assert in_group <= theta_ids or not (in_group & theta_ids)  # never mixed
    # Adam's first step moves every entry with a gradient by about its group's lr.
    theta_step = max(
        (named[n] - before[n]).abs().max().item() for n in before if n.endswith(".theta")
    )
    other_step = max(
        (named[n] - before[n]).abs().max().item() for n in before if not n.endswith(".theta")
    )
    assert theta_step == pytest.approx(ratio * lr, rel=0.05)
    assert other_step == pytest.approx(lr, rel=0.05)


def test_the_language_model_anchor_adds_the_mean_token_nll_of_the_responses(tmp_path, tiny):
    """``nll_weight`` λ: the loss grows by exactly λ × the mean over response rows of their
    mean token NLL (a plain forward at each pair's α), outside the per-objective losses."""
    model, tokenizer = tiny
    pairs = positive_formal_pairs(4, seed=5)
    peft_model = random_pblora(model)

    def trainer_with(weight: float, folder: str) -> PARMTrainer:
        return PARMTrainer(
            copy.deepcopy(peft_model),
            PARMConfig(
                output_dir=str(tmp_path / folder),
                per_device_train_batch_size=4,
                preference_sampling="pair",
                nll_weight=weight,
                **CPU_ARGS,
            ),
            pairs,
            processing_class=tokenizer,
        )

    anchored, plain = trainer_with(0.5, "anchored"), trainer_with(0.0, "plain")
    losses = {}
    for name, trainer in (("anchored", anchored), ("plain", plain)):
        trainer.model.train()
        losses[name] = trainer.compute_loss(trainer.model, one_batch(trainer)).detach()
    assert anchored._metrics["train"]["nll"]  # logged
    # Reference: the responses' token log-probs from the logits, at the α the trainer drew.
    batch = one_batch(plain)
    plain.preference_steps.restart()
    alphas = plain.training_preference(pairs=4)
    plain.set_model_preference(plain.model, torch.cat([alphas, alphas]))
    with torch.no_grad():
        logits = plain.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token = log_probs.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    response = batch["completion_mask"][:, 1:].to(token)
    nll = -((token * response).sum(dim=1) / response.sum(dim=1)).mean()
    assert nll > 0
    torch.testing.assert_close(
        losses["anchored"] - losses["plain"], 0.5 * nll, rtol=1e-4, atol=1e-5
    )


def test_the_language_model_anchor_refuses_bad_weights_and_gradient_level_methods(tmp_path, tiny):
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="nll_weight"):
            PARMConfig(output_dir=str(tmp_path), nll_weight=bad, **CPU_ARGS)
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="nll_weight.*mgda|mgda.*nll_weight"):
        PARMTrainer(
            random_pblora(model),
            PARMConfig(
                output_dir=str(tmp_path),
                aggregator="mgda",
                allow_preference_blind_aggregator=True,
                nll_weight=0.1,
                **CPU_ARGS,
            ),
            positive_formal_pairs(4, seed=6),
            processing_class=tokenizer,
        )
