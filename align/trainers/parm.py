"""PARM: one autoregressive reward model for every objective, conditioned on α by PBLoRA.

Per micro-batch α ~ Dirichlet(p·1) (PARM: p = 0.5) is set on the adapter; each objective's
pairwise ARM loss ``mean(−log σ(β_i (r_w − r_l)))`` is computed with r = r(·; α), each objective
ordering the pair its own way; the multi-gradient core aggregates them (PARM: ``Σ α_i L_i``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peft import PeftModel

from align.adapters import PBLoraConfig
from align.trainers.arm import attention_targets
from align.trainers.base import MultiObjectivePreferenceConfig, MultiObjectivePreferenceTrainer
from align.trainers.data import select_objectives


@dataclass
class PARMConfig(MultiObjectivePreferenceConfig):
    """PARM's defaults (ICML 2025): β_i = 0.01, lr 5e-4 cosine, weight decay 0.05,
    Dirichlet(0.5), linear scalarization; a PBLoRA (r1 = r2 = 4, alpha 8) is added when the
    model has no adapter."""

    learning_rate: float = field(default=5e-4, metadata={"help": "PARM: 5e-4."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "PARM: cosine."})
    weight_decay: float = field(default=0.05, metadata={"help": "PARM: 0.05."})
    beta: float = field(default=0.01, metadata={"help": "PARM: β_i = 0.01."})
    preference_concentration: float = field(default=0.5, metadata={"help": "PARM: 0.5."})
    pblora_r1: int = field(default=4, metadata={"help": "Preference-agnostic rank."})
    pblora_r2: int = field(default=4, metadata={"help": "Preference-aware rank."})
    lora_alpha: float = field(default=8, metadata={"help": "PBLoRA alpha (s = alpha / r2)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "PBLoRA dropout."})


class PARMTrainer(MultiObjectivePreferenceTrainer):
    """Trains a preference-aware ARM on all objectives of a preference dataset at once."""

    _name = "PARM"
    conditioned = True

    def __init__(self, model: Any, args: PARMConfig, train_dataset: Any, *rest: Any, **kwargs: Any):
        if not isinstance(model, PeftModel) and kwargs.get("peft_config") is None:
            kwargs["peft_config"] = PBLoraConfig(
                objectives=list(select_objectives(train_dataset, args.objectives)),
                r1=args.pblora_r1,
                r2=args.pblora_r2,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                target_modules=args.target_modules or attention_targets(model),
                task_type="CAUSAL_LM",
            )
        super().__init__(model, args, train_dataset, *rest, **kwargs)
