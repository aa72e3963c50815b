"""Tiny random models with a real tokenizer, for tests and examples (not imported by align itself).

The tokenizer is a real byte-level BPE trained locally (milliseconds) on text align ships, with
the same ChatML special tokens and chat template style as SmolLM2, so code paths that format
chats, pad and stop on EOS are exercised exactly as with the embedded model.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_EXTRA_TEXT = """
Yes. No. Thank you! That is a great idea, and I love it. This is terrible, awful and wrong.
Here is a short answer. Here is a longer answer with several steps: first, second, third.
The quick brown fox jumps over the lazy dog 0123456789 times.
"""


@functools.cache
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lines = resources.files("align").joinpath("resources/prompts.jsonl").read_text().splitlines()
    corpus = [json.loads(line)["prompt"] for line in lines if line.strip()] + _EXTRA_TEXT.split(
        "\n"
    )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer.to_str()


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer (any text encodes) with ChatML tokens and template."""
    from tokenizers import Tokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _tiny_config(tokenizer: PreTrainedTokenizerFast, **overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_causal_lm(
    tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0, **config_overrides
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A randomly initialised 2-layer Llama (hidden 64) and its tokenizer."""
    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    config = _tiny_config(tokenizer, **config_overrides)
    config.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM(config).eval(), tokenizer


def tiny_reward_model(
    tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0, num_labels: int = 1
) -> tuple[LlamaForSequenceClassification, PreTrainedTokenizerFast]:
    """A randomly initialised sequence classifier: the shape of an HF reward model."""
    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    config = _tiny_config(tokenizer, num_labels=num_labels)
    config.architectures = ["LlamaForSequenceClassification"]
    return LlamaForSequenceClassification(config).eval(), tokenizer
