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
from align.trainers.registry import register_trainer


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
    pblora_theta_init: str = field(
        default="fan_in_m",
        metadata={"help": "Θ's initialisation (PBLoraConfig.theta_init): 'fan_in_m' or 'parm'."},
    )
    alpha_path_lr_ratio: float = field(
        default=1.0,
        metadata={
            "help": "Learning rate of Θ (the map α → W2(α), the only parameters that tell the "
            "objectives apart) relative to learning_rate. With Adam an entry moves about lr per "
            "step, so at lr 1e-3 Θ (entries ~0.5 at init) barely leaves its random start in a "
            "short run; a larger ratio lets the α path learn within it."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.alpha_path_lr_ratio > 0:
            raise ValueError(f"alpha_path_lr_ratio must be > 0, got {self.alpha_path_lr_ratio}")


@register_trainer("parm")
class PARMTrainer(MultiObjectivePreferenceTrainer):
    """Trains a preference-aware ARM on all objectives of a preference dataset at once."""

    config_class = PARMConfig

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
                theta_init=args.pblora_theta_init,
                target_modules=args.target_modules or attention_targets(model),
                task_type="CAUSAL_LM",
            )
        super().__init__(model, args, train_dataset, *rest, **kwargs)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        """TRL's optimizer, with Θ (every PBLoRA core's α map) in groups of its own at
        ``alpha_path_lr_ratio`` × the learning rate (the scheduler scales every group alike)."""
        optimizer = super().create_optimizer(*args, **kwargs)
        ratio = self.args.alpha_path_lr_ratio
        if ratio == 1.0:
            return optimizer
        theta = {
            id(p)
            for name, p in self.accelerator.unwrap_model(self.model).named_parameters()
            if p.requires_grad and "pblora_core" in name and name.endswith(".theta")
        }
        if not theta:
            raise ValueError(
                "alpha_path_lr_ratio is set but the model has no PBLoRA Θ to apply it to"
            )
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in theta]
            if not moved:
                continue
            group["params"] = [p for p in group["params"] if id(p) not in theta]
            optimizer.add_param_group({**group, "params": moved, "lr": group["lr"] * ratio})
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        return optimizer
