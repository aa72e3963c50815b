"""Checking merge inputs before any work: one error that lists every mismatch.

Two checkpoints can be merged tensor by tensor only if they are the same architecture with the
same tensors of the same shapes, and the result is only meaningful if they read text the same
way (the same tokenizer: a merged embedding row is an average of rows that must mean the same
token). Users of merge tools report vocabulary mismatches surfacing halfway through a merge, or
not at all; here every difference is collected first and raised together, before a byte is
written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from align.files import read_json
from align.merging.checkpoint_io import Checkpoint

# Config keys that legitimately differ between fine-tuned copies of one model.
IGNORED_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "_model_name_or_path",
        "_commit_hash",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)


class MergeInputError(ValueError):
    """The merge inputs are incompatible; ``mismatches`` lists every problem found."""

    def __init__(self, mismatches: Sequence[str]):
        self.mismatches = list(mismatches)
        if len(self.mismatches) == 1:  # one problem (a bad file, most often): one line
            super().__init__(f"cannot merge these checkpoints: {self.mismatches[0]}")
            return
        lines = "\n".join(f"  - {line}" for line in self.mismatches)
        super().__init__(
            f"cannot merge these checkpoints: {len(self.mismatches)} mismatches\n{lines}"
        )


def tokenizer_fingerprint(folder: Path) -> str | None:
    """A hash of what decides how text becomes ids: the vocabulary, merges and added tokens.

    ``None`` when the folder holds no tokenizer. Only ``tokenizer.json`` (fast tokenizers) is
    parsed; otherwise the raw bytes of the vocabulary files are hashed.
    """
    digest = hashlib.sha256()
    fast = folder / "tokenizer.json"
    if fast.is_file():
        data = read_json(fast)
        # Padding/truncation settings are runtime options, not the vocabulary.
        relevant = {
            key: data.get(key) for key in ("model", "added_tokens", "normalizer", "pre_tokenizer")
        }
        digest.update(json.dumps(relevant, sort_keys=True).encode("utf-8"))
        return digest.hexdigest()
    found = False
    for name in ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json"):
        path = folder / name
        if path.is_file():
            found = True
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest() if found else None


def _config_differences(reference: dict, other: dict) -> list[str]:
    keys = sorted((set(reference) | set(other)) - IGNORED_CONFIG_KEYS)
    return [
        f"{key}: {reference.get(key, '<missing>')!r} vs {other.get(key, '<missing>')!r}"
        for key in keys
        if reference.get(key, "<missing>") != other.get(key, "<missing>")
    ]


def check_compatible(checkpoints: Sequence[Checkpoint]) -> None:
    """Raise :class:`MergeInputError` listing every mismatch between the checkpoints.

    Compared with the first one: architecture and structural config, tensor names (missing and
    extra), tensor shapes, and the tokenizer (among the inputs that ship one).
    """
    if len(checkpoints) < 2:
        raise MergeInputError([f"a merge needs at least two checkpoints, got {len(checkpoints)}"])
    reference = checkpoints[0]
    problems: list[str] = []
    ref_tokenizer = None
    ref_tokenizer_label = None
    for checkpoint in checkpoints:
        fingerprint = tokenizer_fingerprint(checkpoint.folder)
        if fingerprint is not None and ref_tokenizer is None:
            ref_tokenizer, ref_tokenizer_label = fingerprint, checkpoint.label
    for other in checkpoints[1:]:
        pair = f"{other.label} vs {reference.label}"
        for line in _config_differences(reference.config, other.config):
            problems.append(f"config differs ({pair}): {line}")
        missing = sorted(set(reference.tensors) - set(other.tensors))
        extra = sorted(set(other.tensors) - set(reference.tensors))
        for name in missing:
            problems.append(f"tensor {name} is in {reference.label} but missing from {other.label}")
        for name in extra:
            problems.append(f"tensor {name} is in {other.label} but not in {reference.label}")
        for name in sorted(set(reference.tensors) & set(other.tensors)):
            a, b = reference.tensors[name].shape, other.tensors[name].shape
            if a != b:
                problems.append(
                    f"tensor {name} has shape {list(b)} in {other.label} but {list(a)} in {reference.label}"
                )
            if (
                reference.tensors[name].dtype.is_floating_point
                != other.tensors[name].dtype.is_floating_point
            ):
                problems.append(
                    f"tensor {name} is {other.tensors[name].dtype} in {other.label} but "
                    f"{reference.tensors[name].dtype} in {reference.label}"
                )
    if ref_tokenizer is not None:
        for checkpoint in checkpoints:
            fingerprint = tokenizer_fingerprint(checkpoint.folder)
            if fingerprint is not None and fingerprint != ref_tokenizer:
                problems.append(
                    f"tokenizer of {checkpoint.label} differs from that of {ref_tokenizer_label} "
                    f"(vocabulary, merges or added tokens)"
                )
    if problems:
        raise MergeInputError(problems)
