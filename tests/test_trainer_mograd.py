"""The trainers and the multi-gradient core together: stateful methods observed once per
optimizer step (on the step's mean losses), and preference-blind aggregators refused by the
preference-conditioned trainers (PARM, preference DPO) unless explicitly allowed."""

from __future__ import annotations

import copy

import pytest
import torch
from test_trainers import CPU_ARGS, positive_formal_pairs

from align.mograd.registry import preference_aware_aggregators
from align.trainers import (
    ARMConfig,
    ARMTrainer,
    PARMConfig,
    PARMTrainer,
    PreferenceDPOConfig,
    PreferenceDPOTrainer,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def tiny(tiny_lm):
    return tiny_lm


def _recorded(aggregator) -> list[torch.Tensor]:
    """The loss vectors the method is called with (one per micro-batch), in order."""
    seen: list[torch.Tensor] = []
    aggregator.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    return seen


def test_stateful_methods_are_observed_once_per_optimizer_step_on_its_mean_losses(tmp_path, tiny):
    """Issue 15: with 2 micro-batches per step, 3 steps are 3 observations (not 6), each the
    mean of that step's two loss vectors: STCH's running ideal and nadir warm-up, DWA's history."""
    model, tokenizer = tiny
    steps, accumulation = 3, 2
    trainers = {}
    for name, options, extra in (
        ("stch", {"ideal": "running", "nadir": "warmup", "warmup_steps": 2}, {}),
        ("dwa", {}, {"allow_preference_blind_aggregator": True}),
    ):
        trainer = PARMTrainer(
            copy.deepcopy(model),
            PARMConfig(
                output_dir=str(tmp_path / name),
                per_device_train_batch_size=2,
                gradient_accumulation_steps=accumulation,
                max_steps=steps,
                aggregator=name,
                aggregator_options=options,
                beta=1.0,
                **extra,
                **CPU_ARGS,
            ),
            positive_formal_pairs(12, seed=5),
            processing_class=tokenizer,
        )
        seen = _recorded(trainer.engine.aggregator)
        trainer.train()
        assert len(seen) == steps * accumulation
        means = torch.stack(seen).double().reshape(steps, accumulation, -1).mean(dim=1)
        trainers[name] = (trainer.engine.aggregator, means)

    stch, means = trainers["stch"]
    assert int(stch.steps) == steps
    torch.testing.assert_close(stch.running_min, means.min(dim=0).values)
    # warmup_steps = 2: the nadir is the mean of the second half of the warm-up (step 2).
    torch.testing.assert_close(stch.nadir_point, means[1])

    dwa, means = trainers["dwa"]
    assert int(dwa.entries) == 2
    torch.testing.assert_close(dwa.history, means[-2:])


def test_preference_conditioned_trainers_refuse_aggregators_that_ignore_alpha(tmp_path, tiny):
    model, tokenizer = tiny
    pairs = positive_formal_pairs(4, seed=6)
    aware = preference_aware_aggregators()
    assert {"linear", "tchebycheff", "smooth_tchebycheff", "epo", "upgrad"} <= set(aware)
    assert not {"mgda", "pcgrad", "nash_mtl", "dwa", "famo"} & set(aware)
    for trainer_class, config_class in (
        (PARMTrainer, PARMConfig),
        (PreferenceDPOTrainer, PreferenceDPOConfig),
    ):
        for method in ("mgda", "famo"):
            args = config_class(output_dir=str(tmp_path), aggregator=method, **CPU_ARGS)
            with pytest.raises(ValueError) as refused:
                trainer_class(copy.deepcopy(model), args, pairs, processing_class=tokenizer)
            message = str(refused.value)
            assert method in message and "allow_preference_blind_aggregator" in message
            assert all(name in message for name in aware)  # it names the methods that work
    # The flag lets a run through (and says what it means in its help); ARM has no α at all.
    allowed = PARMTrainer(
        copy.deepcopy(model),
        PARMConfig(
            output_dir=str(tmp_path),
            aggregator="mgda",
            allow_preference_blind_aggregator=True,
            **CPU_ARGS,
        ),
        pairs,
        processing_class=tokenizer,
    )
    assert allowed.engine.name == "mgda"
    arm = ARMTrainer(
        copy.deepcopy(model),
        ARMConfig(output_dir=str(tmp_path), aggregator="mgda", objectives=["positive"], **CPU_ARGS),
        pairs,
        processing_class=tokenizer,
    )
    assert arm.engine.name == "mgda"
    # The preference-aware ones are accepted as they are.
    PARMTrainer(
        copy.deepcopy(model),
        PARMConfig(output_dir=str(tmp_path), aggregator="upgrad", **CPU_ARGS),
        pairs,
        processing_class=tokenizer,
    )


def test_the_preference_aware_flags_match_what_each_method_does_with_alpha():
    """The declared flags against a probe: two different α on the same losses / Gram (an
    independent check, run on fresh instances of every registered method)."""
    from align.mograd.registry import canonical_aggregators
    from lab.synthetic.solvers import responds_to_preference

    for name in canonical_aggregators():
        declared = name in preference_aware_aggregators()
        assert responds_to_preference(name, 3) == declared, name
