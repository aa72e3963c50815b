"""The weights files of the learned methods: safetensors with the network's config and a
summary of how it was trained in the metadata (one format for ML2O and Gram-L2O)."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from align.io import atomic_file


def shipped_weights(name: str) -> Path:
    """A weights file shipped in ``align/mograd/learned/weights/``."""
    return Path(str(resources.files("align.mograd.learned").joinpath("weights", name)))


def save_weights(net: nn.Module, path: str | os.PathLike, **info: Any) -> Path:
    """Write ``net`` (which has a ``config()``) atomically; its config and ``info`` (JSON-able)
    go in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}
    metadata = {
        "config": json.dumps(net.config()),
        "info": json.dumps(info),
        "network": type(net).__name__,
    }
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)  # the weights are meant to ship
    return path


def load_weights(
    network: type[nn.Module],
    source: str | os.PathLike | nn.Module | None,
    default: Path,
    retrain: str,
) -> nn.Module:
    """A ``network``: ``"default"`` (``default``), a path written by :func:`save_weights`, a
    network (returned as is), or None (untrained). ``retrain`` says how to make missing weights."""
    if isinstance(source, network):
        return source
    if source is None:
        return network()
    from safetensors import safe_open
    from safetensors.torch import load_file

    from align.files import read_safetensors_header

    path = default if source == "default" else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{network.__name__} weights not found at {path}; {retrain}")
    read_safetensors_header(path)  # truncated or not safetensors: an error naming the file
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    net = network(**json.loads(metadata.get("config", "{}")))
    net.load_state_dict(load_file(str(path)))
    return net


def weights_info(source: str | os.PathLike, default: Path) -> dict[str, Any]:
    """The ``info`` metadata stored with the weights (what they were trained on, how long)."""
    from safetensors import safe_open

    path = default if source == "default" else Path(source)
    with safe_open(str(path), framework="pt") as handle:
        return json.loads((handle.metadata() or {}).get("info", "{}"))
