"""What every preference-adapter config has: the objectives and PEFT's usual targeting fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from align.preference import check_objectives

# Attention projections by architecture: the references (PARM, GenARM) adapt q/k/v.
QKV_TARGET_MODULES = {
    "llama": ["q_proj", "k_proj", "v_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "k_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
}


@dataclass
class PreferenceAdapterConfig(PeftConfig):
    """Fields shared by SVD-LoRA and PBLoRA; the objective names are stored with the adapter."""

    objectives: list[str] | None = field(
        default=None, metadata={"help": "Objective names, in the order of α's weights."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names or a regex; default: the attention q/k/v projections."},
    )
    exclude_modules: list[str] | str | None = field(default=None)
    modules_to_save: list[str] | None = field(default=None)
    init_weights: bool = field(
        default=True,
        metadata={"help": "Start as the identity (ΔW = 0); False: random (for tests)."},
    )
    bias: str = field(default="none")

    def __post_init__(self) -> None:
        super().__post_init__()
        method = type(self).__name__
        if self.objectives is None:
            raise ValueError(
                f"{method} needs the objective names, in α order, e.g. objectives=['helpful', 'harmless']"
            )
        self.objectives = list(check_objectives(self.objectives))
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"{method} lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
