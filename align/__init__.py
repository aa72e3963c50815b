"""align: multi-objective alignment of language models along a preference vector α."""

from __future__ import annotations

import importlib

from align import _peft_hook, _quiet

__version__ = "0.1.0"

# Heavy imports (torch, PEFT) wait until used, so `align --help` answers at once.
_LAZY = {
    "Preference": "align.preference",
    "sample_preferences": "align.preference",
    "simplex_grid": "align.preference",
}

#: Sub-packages reachable as attributes (``align.scorers``) without an import of their own.
_SUBMODULES = ("adapters", "data", "decoding", "models", "preference", "rewards", "scorers")

__all__ = ["Preference", "__version__", "sample_preferences", "simplex_grid"]

# Third-party start-up noise an align user cannot act on is filtered before it is logged.
_quiet.install()

# SVD-LoRA and PBLoRA are registered with PEFT as soon as PEFT is imported.
_peft_hook.install()


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"align.{name}")
    raise AttributeError(f"module 'align' has no attribute {name!r}")
