"""Streaming checkpoint I/O: read one tensor at a time, write tensors as they are produced.

Reading
    :class:`Checkpoint` indexes a Hugging Face checkpoint folder from the safetensors headers
    alone (names, shapes, dtypes, byte offsets; one file or several shards with
    ``model.safetensors.index.json``) and reads a tensor only when asked, through
    ``safetensors.safe_open``. The file is opened per read and closed at once: a handle kept open
    maps the whole shard, and every page touched stays in the process's resident memory, so
    reading a 538 MB model through one handle ends with 538 MB resident. Reopening costs a header
    parse (microseconds) and keeps the resident set at the tensors actually held. Every read is
    counted (:attr:`Checkpoint.reads`), which is how the tests prove a sweep reads each input
    tensor once. Pickle checkpoints (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) are refused:
    unpickling can run arbitrary code, and merging is often done on checkpoints from strangers.

Writing
    :class:`StreamingWriter` knows every output tensor's name, dtype and shape before the first
    byte (they are those of the validated inputs), so it lays out the safetensors headers and the
    shard boundaries up front and then appends each tensor's bytes the moment it is computed. No
    output shard is ever held in memory: peak memory is the input tensors of one name plus one
    output tensor, whatever ``max_shard_size`` is. More than one shard gets a
    ``model.safetensors.index.json`` as ``save_pretrained`` writes it.

Side files (config, tokenizer, generation config, chat template) are copied by
:func:`copy_side_files`. The caller writes each output folder inside
:func:`align.io.atomic_directory`, so an interrupted merge leaves nothing that looks complete.

Shared by the merging modules
    :func:`resolve_checkpoint`, :func:`read_stack`, :func:`output_plan`,
    :func:`copy_merge_side_files` and the record of every merged checkpoint, :data:`MERGE_INFO`.
    Sweep folders (one checkpoint per α, resumable) are :mod:`align.merging.sweeps`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from align.errors import BadFileError
from align.files import read_json, read_safetensors_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
NOT_WEIGHTS = frozenset({"adapter_model.safetensors", "pareto_factors.safetensors"})

# safetensors dtype codes <-> torch dtypes (the codes the format specifies).
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_code] = getattr(torch, _attr)
_CODES = {dtype: code for code, dtype in _DTYPES.items()}

# Files that travel with the weights (configuration, tokenizer, generation defaults).
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)
TOKENIZER_FILES = tuple(
    name
    for name in SIDE_FILES
    if "token" in name or name in ("vocab.json", "merges.txt", "vocab.txt")
)


class CheckpointError(ValueError):
    """A checkpoint folder cannot be read as a merge input; the message says why and what to do."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, read from a safetensors header."""

    name: str
    shard: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # position of its bytes within the shard's data section (for read order)

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * _itemsize(self.dtype)


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"``, ``"bf16"``, ``"torch.float16"`` or a torch dtype → the torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    aliases = {
        "bf16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
        "fp32": "float32",
        "float": "float32",
        "fp64": "float64",
        "double": "float64",
    }
    key = str(name).strip().lower().removeprefix("torch.")
    key = aliases.get(key, key)
    if key not in ("float32", "float16", "bfloat16", "float64"):
        raise ValueError(
            f"unknown output dtype {name!r}; use float32, bfloat16, float16 or float64"
        )
    return getattr(torch, key)


class Checkpoint:
    """A Hugging Face checkpoint folder read lazily, one tensor at a time.

    ``Checkpoint(folder)`` parses only the config and the safetensors headers; tensors are read
    by :meth:`get_tensor`. ``reads`` counts reads per tensor name.
    """

    def __init__(self, folder: str | os.PathLike, label: str | None = None):
        self.folder = Path(folder).expanduser()
        self.label = label or str(self.folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.label}: no checkpoint folder at {self.folder}")
        self.tensors: dict[str, TensorInfo] = _index_tensors(self.folder, self.label)
        config = self.folder / "config.json"
        self.config: dict[str, Any] = read_json(config) if config.is_file() else {}
        self.reads: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"Checkpoint({self.label!r}, {len(self.tensors)} tensors)"

    @property
    def names(self) -> list[str]:
        """Tensor names in storage order (shard, then position): sequential reads."""
        return [info.name for info in sorted(self.tensors.values(), key=_storage_key)]

    def get_tensor(self, name: str) -> torch.Tensor:
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"{self.label} has no tensor {name!r}")
        self.reads[name] = self.reads.get(name, 0) + 1
        # Open, read, close: see the module notes on resident memory.
        with safe_open(info.shard, framework="pt") as handle:
            return handle.get_tensor(name)

    def has_tokenizer(self) -> bool:
        return any(
            (self.folder / name).is_file()
            for name in ("tokenizer.json", "tokenizer.model", "vocab.json")
        )


def _storage_key(info: TensorInfo) -> tuple[str, int]:
    return (info.shard.name, info.offset)


def refuse_pickles(folder: Path, label: str) -> None:
    pickles = sorted(
        p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()
    )
    if pickles:
        raise CheckpointError(
            f"{label}: {folder} holds pickle weights ({', '.join(pickles)}) and no safetensors. "
            f"align does not unpickle checkpoints: loading a pickle can execute arbitrary code. "
            f"Convert it once where you trust it, e.g. "
            f"AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)"
        )


def _index_tensors(folder: Path, label: str) -> dict[str, TensorInfo]:
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map: dict[str, str] = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise BadFileError(index, "not a safetensors index (no weight_map)")
        shards = sorted(set(weight_map.values()))
    else:
        weight_map = None
        if (folder / SINGLE_NAME).is_file():
            shards = [SINGLE_NAME]
        else:
            # Other *.safetensors (adapters, Pareto-merging factors) are not model weights.
            shards = sorted(
                p.name for p in folder.glob("*.safetensors") if p.name not in NOT_WEIGHTS
            )
    if not shards:
        refuse_pickles(folder, label)
        raise CheckpointError(f"{label}: no *.safetensors weights in {folder}")
    tensors: dict[str, TensorInfo] = {}
    for shard_name in shards:
        shard = folder / shard_name
        if not shard.is_file():
            raise BadFileError(folder / INDEX_NAME, f"names {shard_name}, which is missing")
        for name, entry in read_safetensors_header(shard).items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in _DTYPES:
                raise CheckpointError(
                    f"{label}: tensor {name} has unsupported dtype {entry['dtype']}"
                )
            if name in tensors:
                raise CheckpointError(f"{label}: tensor {name} is stored twice ({shard_name})")
            if weight_map is not None and weight_map.get(name) != shard_name:
                continue  # a stale tensor the index does not point at
            tensors[name] = TensorInfo(
                name=name,
                shard=shard,
                dtype=_DTYPES[entry["dtype"]],
                shape=tuple(entry["shape"]),
                offset=int(entry["data_offsets"][0]),
            )
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(
                f"{label}: {INDEX_NAME} lists tensors no shard holds: {missing[:10]}"
            )
    return tensors


# --- writing -----------------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count → bytes (HF's decimal units)."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"a shard size must be > 0 bytes, got {size}")
        return size
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B?)\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot parse size {size!r}; write e.g. '5GB' or '500MB'")
    number, unit = float(match.group(1)), match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[
        unit.replace("I", "").replace("B", "") or ""
    ]
    value = int(number * base**power)
    if value <= 0:
        raise ValueError(f"a shard size must be > 0 bytes, got {size!r}")
    return value


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * _itemsize(self.dtype)


class StreamingWriter:
    """Write tensors to safetensors shards as they are produced, in a planned order.

    ``plan`` lists every tensor (name, dtype, shape) in the order :meth:`write` will receive
    them. Shards are cut greedily so none exceeds ``max_shard_size`` (a tensor larger than the
    limit gets a shard of its own, as ``save_pretrained`` does). :meth:`close` checks that every
    planned tensor arrived and writes the index when there are several shards.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        plan: Iterable[OutputTensor],
        *,
        max_shard_size: int | str = "5GB",
        metadata: dict[str, str] | None = None,
    ):
        self.folder = Path(folder)
        self.plan = list(plan)
        if not self.plan:
            raise ValueError("nothing to write: the plan has no tensors")
        limit = parse_size(max_shard_size)
        groups: list[list[OutputTensor]] = [[]]
        size = 0
        for item in self.plan:
            if groups[-1] and size + item.nbytes > limit:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += item.nbytes
        count = len(groups)
        names = (
            [SINGLE_NAME]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._metadata = {"format": "pt", **(metadata or {})}
        self._shards = list(zip(names, groups))
        self._order = [item.name for item in self.plan]
        self._expected = {item.name: item for item in self.plan}
        self._position = 0
        self._shard_index = -1
        self._in_shard = 0
        self._handle = None
        self._total = 0

    def _open_next_shard(self) -> None:
        self._finish_shard()
        self._shard_index += 1
        name, group = self._shards[self._shard_index]
        header: dict[str, Any] = {"__metadata__": self._metadata}
        offset = 0
        for item in group:
            header[item.name] = {
                "dtype": _CODES[item.dtype],
                "shape": list(item.shape),
                "data_offsets": [offset, offset + item.nbytes],
            }
            offset += item.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the library does
        self._handle = open(self.folder / name, "wb")  # noqa: SIM115 — closed in _finish_shard
        self._handle.write(struct.pack("<Q", len(raw)))
        self._handle.write(raw)
        self._in_shard = 0

    def _finish_shard(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must be the next one in the plan, with its dtype and shape."""
        if self._position >= len(self._order):
            raise ValueError(f"tensor {name!r} is beyond the plan ({len(self._order)} tensors)")
        expected = self._order[self._position]
        if name != expected:
            raise ValueError(
                f"tensors must arrive in plan order: expected {expected!r}, got {name!r}"
            )
        item = self._expected[name]
        if tensor.dtype != item.dtype or tuple(tensor.shape) != item.shape:
            raise ValueError(
                f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"the plan says {item.dtype} {item.shape}"
            )
        if self._handle is None or self._in_shard == len(self._shards[self._shard_index][1]):
            self._open_next_shard()
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._handle.write(memoryview(data.numpy()))
        self._in_shard += 1
        self._position += 1
        self._total += item.nbytes

    def close(self) -> list[str]:
        """Finish the last shard, write the index if sharded; returns the shard file names."""
        self._finish_shard()
        if self._position != len(self._order):
            missing = self._order[self._position :]
            raise ValueError(
                f"{len(missing)} planned tensors were never written, first {missing[0]!r}"
            )
        names = [name for name, _ in self._shards]
        if len(names) > 1:
            weight_map = {item.name: name for name, group in self._shards for item in group}
            index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
            (self.folder / INDEX_NAME).write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n"
            )
        return names

    def abort(self) -> None:
        """Close any open file (the caller's atomic folder is then discarded)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def copy_side_files(
    source: Path,
    target: Path,
    *,
    dtype: torch.dtype | None = None,
    names: Sequence[str] = SIDE_FILES,
) -> list[str]:
    """Copy config, tokenizer and generation files; record the output dtype in config.json."""
    copied = []
    for name in names:
        path = source / name
        if not path.is_file():
            continue
        if name == "config.json" and dtype is not None:
            config = read_json(path)
            dtype_name = str(dtype).removeprefix("torch.")
            # transformers 5 writes "dtype"; older versions read "torch_dtype".
            key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
            config[key] = dtype_name
            (target / name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copy2(path, target / name)
        copied.append(name)
    return copied


# --- what several merging modules share: inputs and the merge record --------------------------

#: The record in every merged checkpoint folder (method, parameters, objectives, α, inputs).
MERGE_INFO = "align_merge.json"


def resolve_checkpoint(reference: str | os.PathLike) -> Path:
    """A local folder as it is; an embedded model name (e.g. ``smollm2-135m-instruct``) via its
    cache. transformers is imported only in the second case (it takes seconds to import)."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return path
    from align.models.loading import resolve_model_path

    return Path(resolve_model_path(reference))


def read_stack(models: Sequence[Checkpoint], name: str, dtype: torch.dtype) -> torch.Tensor:
    """The K input tensors of one name as one ``(K, *shape)`` tensor, each read exactly once."""
    first = models[0].get_tensor(name)
    stacked = torch.empty((len(models), *first.shape), dtype=dtype)
    stacked[0] = first
    del first
    for k, model in enumerate(models[1:], start=1):
        stacked[k] = model.get_tensor(name)  # copied into place, the read tensor freed at once
    return stacked


def output_plan(
    order: Checkpoint, reference: Checkpoint, dtype: torch.dtype | None
) -> list[OutputTensor]:
    """The output tensors in ``order``'s storage order, with ``reference``'s dtypes and shapes
    (floating tensors cast to ``dtype`` when one is given)."""
    plan = []
    for name in order.names:
        info = reference.tensors[name]
        out_dtype = dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype
        plan.append(OutputTensor(name, out_dtype, info.shape))
    return plan


def copy_merge_side_files(
    reference: Checkpoint,
    checkpoints: Sequence[Checkpoint],
    folder: Path,
    dtype: torch.dtype | None,
) -> None:
    """Side files from ``reference``; the tokenizer from another input if it has none (a
    fine-tuned copy saved without its tokenizer)."""
    copied = copy_side_files(reference.folder, folder, dtype=dtype)
    if not any(name in copied for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        for checkpoint in checkpoints:
            if checkpoint.has_tokenizer():
                copy_side_files(checkpoint.folder, folder, names=TOKENIZER_FILES)
                break


def write_merge_info(folder: Path, record: Mapping[str, Any]) -> None:
    (folder / MERGE_INFO).write_text(json.dumps(record, indent=2) + "\n")
