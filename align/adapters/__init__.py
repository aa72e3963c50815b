"""Preference-aware adapters as PEFT tuners: SVD-LoRA (Panacea) and PBLoRA (PARM).

Importing this package registers both with PEFT, so ``get_peft_model``, ``save_pretrained`` and
``PeftModel.from_pretrained`` work as they do for LoRA::

    from peft import get_peft_model
    from align.adapters import PBLoraConfig, set_preference

    model = get_peft_model(base, PBLoraConfig(objectives=["helpful", "harmless"]))
    set_preference(model, {"helpful": 0.7, "harmless": 0.3})   # stays set until changed
    model(input_ids, pref=[0.2, 0.8])                          # or for one call only
    merged = model.merge_and_unload(preference=[0.5, 0.5])    # a plain transformers model
"""

from __future__ import annotations

from typing import Any

from torch import nn

from align.adapters.base import PreferenceLayer, PreferenceNotSetError, PreferenceTuner
from align.adapters.pblora import PBLoraConfig, PBLoraModel
from align.adapters.registry import register
from align.adapters.svdlora import SVDLoraConfig, SVDLoraModel
from align.preference import Preference, PreferenceLike

register()


def preference_tuner(model: nn.Module) -> PreferenceTuner:
    """The preference tuner inside a PeftModel (or the tuner itself)."""
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, PreferenceTuner):
        raise TypeError(
            f"{type(model).__name__} carries no preference adapter (SVD-LoRA / PBLoRA); "
            f"wrap it with get_peft_model(model, PBLoraConfig(...)) first"
        )
    return tuner


def set_preference(
    model: nn.Module, preference: PreferenceLike | None, adapter: str | None = None
) -> Preference | None:
    """Set α on every preference layer of ``model``; it stays set until changed. None clears it.

    α may be a vector, a dict by objective name, a string ``"helpful=0.7,harmless=0.3"``, a
    :class:`~align.Preference`, or a ``(B, m)`` batch giving each example its own α.
    """
    return preference_tuner(model).set_preference(preference, adapter)


def get_preference(model: nn.Module, adapter: str | None = None) -> Preference | None:
    return preference_tuner(model).get_preference(adapter)


def objectives_of(model: nn.Module, adapter: str | None = None) -> tuple[str, ...]:
    return preference_tuner(model).objectives_of(adapter)


def merge_at_preference(model: nn.Module, preference: PreferenceLike, **kwargs: Any) -> nn.Module:
    """Fold the adapter at α into the base weights and return the plain transformers model."""
    return preference_tuner(model).merge_and_unload(preference=preference, **kwargs)


__all__ = [
    "PBLoraConfig",
    "PBLoraModel",
    "PreferenceLayer",
    "PreferenceNotSetError",
    "PreferenceTuner",
    "SVDLoraConfig",
    "SVDLoraModel",
    "get_preference",
    "merge_at_preference",
    "objectives_of",
    "preference_tuner",
    "set_preference",
]
