"""Checking a checkpoint before a run resumes from it.

align writes checkpoints atomically, so a broken one was damaged afterwards (a copy cut short,
a disk error, a file removed by hand). transformers would then stop with a safetensors or
pickle error and no file name, or resume quietly without a missing part: without
``adapter_config.json``, without the scheduler (it then drops the optimizer too), or with
adapter tensors left at their initial values. One error naming the file comes instead, before
any training step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from align.adapters.loading import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_loaded_keys
from align.errors import BadFileError
from align.files import check_torch_file, read_json, read_safetensors_header

TRAINER_STATE = "trainer_state.json"
#: torch.save files a checkpoint may hold (the multi-objective method's state included), checked
#: as archives without unpickling them.
TORCH_FILES = ("optimizer.pt", "scheduler.pt", "rng_state*.pth", "mograd_state*.pt")


def check_checkpoint(folder: str | os.PathLike, trainer: Any = None) -> None:
    """Raise, naming the file, when ``folder`` is not a complete, readable checkpoint; given the
    ``trainer`` that resumes, also when the weights lack some of its adapter's tensors or the
    multi-objective state is another method's."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {folder}")
    # DeepSpeed resumes the weights and the optimizer from its own global_step*/ files.
    deepspeed = any(folder.glob("global_step*"))
    required = (TRAINER_STATE,) if deepspeed else (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINER_STATE)
    missing = [name for name in required if not (folder / name).is_file()]
    # No optimizer.pt is a checkpoint saved with save_only_model (transformers then starts a new
    # optimizer); the optimizer without its scheduler is a damaged one.
    pair = {name: (folder / name).is_file() for name in ("optimizer.pt", "scheduler.pt")}
    if not deepspeed and any(pair.values()):
        missing += [name for name, present in pair.items() if not present]
    if missing:
        raise BadFileError(
            folder,
            f"incomplete checkpoint, no {' or '.join(missing)} (remove the folder to resume "
            f"from an earlier checkpoint, or set resume: false)",
        )
    read_json(folder / TRAINER_STATE)
    if (folder / ADAPTER_CONFIG).is_file():
        read_json(folder / ADAPTER_CONFIG)
    if (folder / ADAPTER_WEIGHTS).is_file():
        read_safetensors_header(folder / ADAPTER_WEIGHTS)
    for pattern in TORCH_FILES:
        for path in sorted(folder.glob(pattern)):
            check_torch_file(path)
    model = getattr(trainer, "model", None)
    if hasattr(model, "peft_config"):
        adapter = getattr(model, "active_adapter", "default")
        check_loaded_keys(model, folder, adapter if isinstance(adapter, str) else "default")
    engine = getattr(trainer, "engine", None)
    if engine is not None:
        for path in sorted(folder.glob("mograd_state*.pt")):
            check_method_state(path, engine)


def check_method_state(path: Path, engine: Any) -> None:
    """A multi-objective method's saved state must hold what ``engine``'s method keeps (a state
    file from another method would fail in ``load_state_dict`` with a traceback)."""
    import pickle

    import torch

    try:
        state = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:  # a sound archive
        raise BadFileError(path, f"not a multi-objective method state ({error})") from None
    saved = state.get("aggregator") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        raise BadFileError(path, "not a multi-objective method state (no 'aggregator' entry)")
    # Entries the method does not keep mean another method's state. Missing ones are left to
    # the method's own loader, which fills in what older versions did not save (FAMO).
    expected = set(engine.aggregator.state_dict())
    if set(saved) - expected:
        raise BadFileError(
            path,
            f"holds another method's state (entries {sorted(saved)}; {engine.name} keeps "
            f"{sorted(expected)})",
        )
