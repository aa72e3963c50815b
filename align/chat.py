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
