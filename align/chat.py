"""Formatting prompts for chat models."""

from __future__ import annotations

from typing import Any


def format_prompt(tokenizer: Any, prompt: str, system: str | None = None) -> str:
    """The text a model sees for a user prompt: the chat template with the assistant turn
    opened when the tokenizer has one, else the prompt itself."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer: Any, prompts: list[str], chat_template: bool = True) -> Any:
    """Left-padded token ids for a batch of prompts, ready to continue from the right edge
    (decoder-only models generate there). With the chat template, it already placed the
    special tokens, so the tokenizer adds none."""
    texts = [format_prompt(tokenizer, p) if chat_template else p for p in prompts]
    return tokenizer(
        texts,
        return_tensors="pt",
        padding=True,
        padding_side="left",
        add_special_tokens=not chat_template,
    )
