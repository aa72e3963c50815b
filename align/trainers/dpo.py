"""Preference-conditioned DPO (Panacea-style): one policy for the whole Pareto front.

The policy carries an SVD-LoRA (Panacea) or PBLoRA adapter; per micro-batch α ~ Dirichlet(p·1)
is set on it, each objective has its own DPO loss ``mean(−log σ(β (Δ_w − Δ_l)))`` with
``Δ = log π_θ(y | x; α) − log π_ref(y | x)`` (reference: the base model, adapter off), and the
multi-gradient core aggregates the m losses (Panacea: linear or Tchebycheff). With one objective
this is TRL's DPO sigmoid loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel

import align.adapters  # noqa: F401 — registers the tuners
from align.adapters.base import ADAPTERS
from align.trainers.arm import attention_targets
from align.trainers.base import MultiObjectivePreferenceConfig, MultiObjectivePreferenceTrainer
from align.trainers.data import select_objectives
from align.trainers.pair_scoring import PairScores
from align.trainers.registry import register_trainer

#: The preference adapters a policy can get (the lower-case names of the adapter registry).
ADAPTER_NAMES = tuple(name.lower() for name in ADAPTERS.names())


@dataclass
class PreferenceDPOConfig(MultiObjectivePreferenceConfig):
    """Panacea's defaults: Dirichlet(1), SVD-LoRA of rank 8; DPO's β 0.1."""

    adapter: str = field(
        default="svdlora",
        metadata={"help": "Adapter added when the model has none.", "choices": ADAPTER_NAMES},
    )
    adapter_rank: int = field(default=8, metadata={"help": "SVD-LoRA rank r, or PBLoRA r1 = r2."})
    lora_alpha: float = field(default=8, metadata={"help": "Adapter scaling numerator."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Adapter learning rate."})

    def __post_init__(self) -> None:
        super().__post_init__()
        ADAPTERS.get(self.adapter)  # an unknown name lists the available ones


@register_trainer("dpo")
class PreferenceDPOTrainer(MultiObjectivePreferenceTrainer):
    """DPO for a policy conditioned on α, one DPO loss per objective."""

    config_class = PreferenceDPOConfig

    _name = "PreferenceDPO"
    conditioned = True

    def __init__(
        self, model: Any, args: PreferenceDPOConfig, train_dataset: Any, *rest: Any, **kwargs: Any
    ):
        if not isinstance(model, PeftModel) and kwargs.get("peft_config") is None:
            objectives = list(select_objectives(train_dataset, args.objectives))
            targets = attention_targets(model)
            config_class = ADAPTERS.get(args.adapter).config_class
            config = config_class.with_rank(
                args.adapter_rank,
                objectives=objectives,
                lora_alpha=args.lora_alpha,
                target_modules=targets,
                task_type="CAUSAL_LM",
            )
            kwargs["peft_config"] = config
        super().__init__(model, args, train_dataset, *rest, **kwargs)

    def score_pairs(self, model: Any, inputs: Mapping[str, torch.Tensor]) -> PairScores:
        """Implicit DPO rewards ``log π_θ(y|x; α) − log π_ref(y|x)`` of both responses (the
        NLL: the policy's)."""
        log_probs = self.response_log_probs(model, inputs)
        policy = log_probs.score(self.args.length_normalize)
        with torch.no_grad():
            if self.ref_model is not None:
                reference = self.sequence_log_probs(self.ref_model, inputs)
            else:
                with self.accelerator.unwrap_model(model).disable_adapter():
                    reference = self.sequence_log_probs(model, inputs)
        return PairScores(*(policy - reference).chunk(2), -log_probs.mean().mean())
