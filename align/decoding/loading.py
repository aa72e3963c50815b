"""Loading guiding models (ARMs, PARMs, policies) for decoding from the command line or configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align.models import load_model, load_tokenizer, resolve_model_path


def load_guide(
    reference: str, base: str | None = None, base_model: Any = None, **kwargs: Any
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a guide: a PEFT adapter folder (loaded onto the base it names,
    or ``base`` when it names none) or any model :func:`align.models.load_model` accepts.

    When the adapter belongs on ``base`` and that model is already loaded (``base_model``), it
    is attached to it instead of a second copy: guided decoding then runs base and guide rows as
    one batched forward, and the weights sit in memory once.
    """
    folder = Path(reference).expanduser()
    if not (folder / "adapter_config.json").is_file():
        return load_model(reference, **kwargs)
    from align.adapters.loading import check_adapter_folder, load_adapter

    named = check_adapter_folder(folder).get("base_model_name_or_path")
    source = named or base
    if source is None:
        raise ValueError(
            f"the adapter in {folder} names no base model; pass the base it was trained on"
        )
    same_base = base is not None and resolve_model_path(source) == resolve_model_path(base)
    if base_model is not None and same_base:
        return load_adapter(base_model, folder).eval(), load_tokenizer(base)
    model, tokenizer = load_model(source, **kwargs)
    return load_adapter(model, folder).eval(), tokenizer
