"""Models by name (embedded, local, hub). Tiny random models for tests: :mod:`align.testing`."""

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
]
