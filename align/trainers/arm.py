"""GenARM's autoregressive reward model: one objective, pairwise loss, no reference model.

``r(x, y) = Σ_t log π(y_t | x, y_<t)`` over the response tokens, trained with
``−log σ(β (r(x, y_w) − r(x, y_l)))``. GenARM trains one such ARM per objective (LoRA r 8,
alpha 16 on q/k/v, lr 5e-4, β 0.5 / 0.01 / 0.05 by dataset) and mixes them at decoding time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peft import LoraConfig, PeftModel

from align.adapters.config import QKV_TARGET_MODULES
from align.trainers.base import MultiObjectivePreferenceConfig, MultiObjectivePreferenceTrainer
from align.trainers.registry import register_trainer


def attention_targets(model: Any) -> list[str]:
    """The q/k/v projection names of the model's architecture (what GenARM and PARM adapt)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return list(QKV_TARGET_MODULES.get(model_type, ["q_proj", "k_proj", "v_proj"]))


@dataclass
class ARMConfig(MultiObjectivePreferenceConfig):
    """GenARM's defaults; a LoRA adapter is added when the model has none."""

    learning_rate: float = field(default=5e-4, metadata={"help": "GenARM: 5e-4."})
    beta: float = field(default=0.05, metadata={"help": "β of the pairwise ARM loss."})
    lora_r: int = field(default=8, metadata={"help": "Rank of the LoRA adapter added."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha of the adapter added."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})


@register_trainer("arm")
class ARMTrainer(MultiObjectivePreferenceTrainer):
    """Trains a GenARM autoregressive reward model for one objective of a preference dataset."""

    config_class = ARMConfig

    _name = "ARM"
    conditioned = False
    single_objective = True

    def __init__(self, model: Any, args: ARMConfig, *rest: Any, **kwargs: Any) -> None:
        if not isinstance(model, PeftModel) and kwargs.get("peft_config") is None:
            kwargs["peft_config"] = LoraConfig(
                r=args.lora_r,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                target_modules=args.target_modules or attention_targets(model),
                task_type="CAUSAL_LM",
            )
        super().__init__(model, args, *rest, **kwargs)
