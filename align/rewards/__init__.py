"""Reward models: autoregressive reward models (ARM, GenARM) and, with a PBLoRA adapter, PARM."""

from align.rewards.arm import (
    IGNORE_INDEX,
    arm_rewards,
    encode_responses,
    pairwise_loss,
    sequence_log_probs,
    tokenize_prompt,
    tokenize_response,
)

__all__ = [
    "IGNORE_INDEX",
    "arm_rewards",
    "encode_responses",
    "pairwise_loss",
    "sequence_log_probs",
    "tokenize_prompt",
    "tokenize_response",
]
