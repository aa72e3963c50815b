"""Config fields and checks shared by the preference adapters."""

from __future__ import annotations

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


def validate_common(config, method: str) -> None:
    """Checks every preference-adapter config runs in ``__post_init__``."""
    if config.objectives is None:
        raise ValueError(
            f"{method} needs the objective names, in α order, e.g. objectives=['helpful', 'harmless']"
        )
    config.objectives = list(check_objectives(config.objectives))
    if not 0 <= config.lora_dropout < 1:
        raise ValueError(f"{method} lora_dropout must be in [0, 1), got {config.lora_dropout}")
    if isinstance(config.target_modules, (list, tuple)):
        config.target_modules = set(config.target_modules)
