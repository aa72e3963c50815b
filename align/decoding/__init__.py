"""Decoding: one decoder (:class:`DecodingBatch`) for reward-guided decoding (PARM, GenARM, MOD,
preference policies, LoRA soups), its drivers, and plain batched generation."""

from align.decoding.batch import DecodingBatch, RowSettings, Step
from align.decoding.guidance import (
    Guidance,
    check_same_tokenizer,
    genarm_guidance,
    mod_guidance,
    parm_guidance,
    policy_guidance,
)
from align.decoding.guided import (
    guided_custom_generate,
    guided_decode,
    guided_generate,
    guided_sweep,
)
from align.decoding.plain import generate_responses
from align.decoding.sampling import Sampler, choose_tokens, sampling_processors
from align.decoding.soup import lora_soup

__all__ = [
    "DecodingBatch",
    "Guidance",
    "RowSettings",
    "Sampler",
    "Step",
    "check_same_tokenizer",
    "choose_tokens",
    "genarm_guidance",
    "generate_responses",
    "guided_custom_generate",
    "guided_decode",
    "guided_generate",
    "guided_sweep",
    "lora_soup",
    "mod_guidance",
    "parm_guidance",
    "policy_guidance",
    "sampling_processors",
]
