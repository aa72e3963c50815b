"""Decoding: plain batched generation and reward-guided decoding (PARM, GenARM, MOD)."""

from align.decoding.guided import (
    Guidance,
    check_same_tokenizer,
    genarm_guidance,
    guided_custom_generate,
    guided_decode,
    guided_generate,
    guided_sweep,
    mod_guidance,
    parm_guidance,
    sampling_processors,
)
from align.decoding.plain import generate_responses

__all__ = [
    "Guidance",
    "check_same_tokenizer",
    "genarm_guidance",
    "generate_responses",
    "guided_custom_generate",
    "guided_decode",
    "guided_generate",
    "guided_sweep",
    "mod_guidance",
    "parm_guidance",
    "sampling_processors",
]
