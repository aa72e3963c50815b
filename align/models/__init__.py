"""Models by name (embedded, local, hub) and tiny random models for tests."""

from align.models.loading import (
    EMBEDDED_MODEL,
    EMBEDDED_MODELS,
    ModelLoadError,
    cache_root,
    embedded_gguf_path,
    embedded_model_path,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from align.models.tiny import tiny_causal_lm, tiny_reward_model, tiny_tokenizer

__all__ = [
    "EMBEDDED_MODEL",
    "EMBEDDED_MODELS",
    "ModelLoadError",
    "cache_root",
    "embedded_gguf_path",
    "embedded_model_path",
    "load_model",
    "load_tokenizer",
    "resolve_model_path",
    "tiny_causal_lm",
    "tiny_reward_model",
    "tiny_tokenizer",
]
