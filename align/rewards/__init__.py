"""Reward models: autoregressive reward models (ARM, GenARM) and, with a PBLoRA adapter, PARM."""

from align.rewards.arm import (
    IGNORE_INDEX,
    TRAINING_INFO,
    arm_rewards,
    encode_responses,
    reward_settings,
    sequence_log_probs,
    tokenize_prompt,
    tokenize_response,
)

__all__ = [
    "IGNORE_INDEX",
    "TRAINING_INFO",
    "arm_rewards",
    "encode_responses",
    "reward_settings",
    "sequence_log_probs",
    "tokenize_prompt",
    "tokenize_response",
]
