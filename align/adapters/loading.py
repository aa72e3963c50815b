"""Loading adapter folders strictly: a broken folder is an error naming the file, never a warning.

PEFT loads an adapter whose weights file lacks some of the adapter's tensors with a warning
("Found missing adapter keys"), leaving those tensors at their initial values: PBLoRA's or
LoRA's zero-initialised B, or a random core, so the model silently computes something else.
Here the folder is checked first (its config is a JSON object, its weights a complete
safetensors file) and the loaded adapter's tensors are compared with the file's afterwards.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from align.errors import BadFileError
from align.files import read_json, read_safetensors_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_adapter_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``adapter_config.json`` of a PEFT adapter folder, once it and the weights next to it
    have been checked."""
    folder = Path(folder).expanduser()
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: not an adapter folder (no {ADAPTER_CONFIG})")
    config = read_json(config_file)
    if not isinstance(config.get("peft_type"), str):
        raise BadFileError(config_file, "not a PEFT adapter config (no peft_type)")
    weights = folder / ADAPTER_WEIGHTS
    if weights.is_file():
        read_safetensors_header(weights)
    elif not (folder / "adapter_model.bin").is_file():
        raise FileNotFoundError(f"{folder}: no {ADAPTER_WEIGHTS} beside its {ADAPTER_CONFIG}")
    return config


def check_loaded_keys(model: Any, folder: str | os.PathLike, adapter_name: str = "default") -> None:
    """Every tensor of ``adapter_name`` in ``model`` must have come from the folder's weights."""
    from peft.utils import get_peft_model_state_dict

    weights = Path(folder).expanduser() / ADAPTER_WEIGHTS
    if not weights.is_file():
        return  # a pickled adapter_model.bin: PEFT's own loading is all there is
    stored = set(read_safetensors_header(weights)) - {"__metadata__"}
    expected = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    missing = sorted(expected - stored)
    if missing:
        raise BadFileError(
            weights,
            f"lacks {len(missing)} of the adapter's {len(expected)} tensors (first "
            f"{missing[0]}): cut down, or saved for another adapter configuration",
        )


def load_adapter(
    model: Any, folder: str | os.PathLike, adapter_name: str = "default", **kwargs: Any
) -> Any:
    """``PeftModel.from_pretrained(model, folder)``, or ``model.load_adapter(folder, name)``
    when ``model`` is a PeftModel already; returns the PeftModel. Raises instead of loading an
    adapter with tensors missing."""
    from peft import PeftModel

    import align.adapters  # noqa: F401  registers PBLoRA / SVD-LoRA with PEFT

    check_adapter_folder(folder)
    with warnings.catch_warnings():
        # Missing tensors are raised as an error by check_loaded_keys instead.
        warnings.filterwarnings("ignore", message="Found missing adapter keys")
        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=adapter_name, **kwargs)
        else:
            model = PeftModel.from_pretrained(
                model, str(folder), adapter_name=adapter_name, **kwargs
            )
    check_loaded_keys(model, folder, adapter_name)
    return model
