"""Loaders that turn public preference layouts into align's schema (:mod:`align.data.schema`).

Every loader takes either a path to a local file (``.jsonl``, ``.json``, ``.csv``,
``.parquet``) or an already loaded :class:`datasets.Dataset` (e.g. from
``datasets.load_dataset("PKU-Alignment/PKU-SafeRLHF", split="train")``), and returns a
validated dataset in the schema. Nothing here reaches the network: fetching is the caller's
business, converting is ours.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset

from align.data.schema import (
    PAIR_COLUMNS,
    PREFERRED_PREFIX,
    TEXT_COLUMNS,
    TIE,
    load_jsonl,
    make_preference_dataset,
    validate_preference_dataset,
)
from align.errors import BadFileError
from align.files import check_text_file, read_text
from align.preference import check_objectives

Source = str | os.PathLike | Dataset

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
#: What each suffix is called in errors.
FORMAT_NAMES = {".jsonl": "JSON Lines", ".json": "JSON", ".csv": "CSV", ".parquet": "Parquet"}
PKU_COLUMNS = ("prompt", "response_0", "response_1", "better_response_id", "safer_response_id")
HH_COLUMNS = ("chosen", "rejected")
ASSISTANT_TURN = "\n\nAssistant:"
LAYOUTS = ("schema", "pku-saferlhf", "per-objective")


# --- reading a source --------------------------------------------------------------------------
def read_source(source: Source) -> Dataset:
    """A :class:`datasets.Dataset` from a local file (by its suffix) or the dataset itself."""
    if isinstance(source, Dataset):
        return source
    if isinstance(source, DatasetDict):
        raise ValueError(
            f"got a DatasetDict with splits {list(source)}; pass one split, e.g. source['train']"
        )
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a file path or a datasets.Dataset, got {type(source).__name__}")
    path = Path(source)
    file_format = FILE_FORMATS.get(path.suffix.lower())
    if file_format is None:
        raise ValueError(
            f"cannot read {path}: unknown suffix {path.suffix!r}; known: {sorted(FILE_FORMATS)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    check_data_file(path)
    from datasets.exceptions import DatasetGenerationError
    from pyarrow import ArrowException

    try:
        with _quiet_readers():
            return load_dataset(file_format, data_files=str(path), split="train")
    except (DatasetGenerationError, ArrowException) as error:
        # datasets says "An error occurred while generating the dataset": name the file and the
        # reader's own complaint (or, for JSON, the first line that does not parse).
        name = FORMAT_NAMES[path.suffix.lower()]
        raise BadFileError(path, f"not valid {name} ({_parse_problem(path, error)})") from error


#: The datasets readers log the error they then raise ("Failed to load JSON from file ..."):
#: with the error raised as one line here, that log would be a second, longer copy of it.
_READER_LOGGERS = tuple(
    f"datasets.packaged_modules.{name}.{name}" for name in ("json", "csv", "parquet")
)


class _DropReaderErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to ")


@contextlib.contextmanager
def _quiet_readers() -> Iterator[None]:
    dropped = _DropReaderErrors()
    loggers = [logging.getLogger(name) for name in _READER_LOGGERS]
    for logger in loggers:
        logger.addFilter(dropped)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(dropped)


def check_data_file(path: Path) -> None:
    """What can be told before parsing: an empty file, text that is not UTF-8, a file without
    Parquet's ``PAR1`` markers (truncated, or another format under a .parquet name)."""
    if path.suffix.lower() != ".parquet":
        check_text_file(path, "no records")
        return
    size = path.stat().st_size
    if size == 0:
        raise BadFileError(path, "empty file (no records)")
    with open(path, "rb") as handle:
        head = handle.read(4)
        handle.seek(max(0, size - 4))
        tail = handle.read(4)
    if head != b"PAR1" or tail != b"PAR1" or size < 12:
        where = "start" if head != b"PAR1" else "end"
        raise BadFileError(path, f"truncated or not a Parquet file (no PAR1 marker at its {where})")


def _parse_problem(path: Path, error: BaseException) -> str:
    """Where a file that datasets could not read goes wrong, in a few words."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for number, line in enumerate(read_text(path).splitlines(), start=1):
            try:
                if line.strip():
                    json.loads(line)
            except json.JSONDecodeError as problem:
                return f"{problem.msg}: line {number}, column {problem.colno}"
    if suffix == ".json":
        try:
            json.loads(read_text(path))
        except json.JSONDecodeError as problem:
            return f"{problem.msg}: line {problem.lineno}, column {problem.colno}"
    cause = error.__cause__ or error
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]


def _require_columns(dataset: Dataset, expected: Sequence[str], layout: str) -> None:
    """Every expected column must be present (extra columns are fine: loaders drop them)."""
    found = list(dataset.column_names)
    missing = [name for name in expected if name not in found]
    if missing:
        raise ValueError(
            f"{layout}: missing columns {missing}; found columns {found}, expected columns "
            f"{list(expected)}"
        )


def _column(dataset: Dataset, name: str) -> list[Any]:
    # Reading through Arrow is ~100x faster than iterating a datasets Column.
    return dataset.with_format("arrow")[name].to_pylist()


# --- PKU-SafeRLHF ------------------------------------------------------------------------------
def load_pku_saferlhf(
    source: Source, objectives: Sequence[str] = ("helpful", "harmless")
) -> Dataset:
    """PKU-SafeRLHF: ``better_response_id`` -> first objective, ``safer_response_id`` -> second.

    Ids are 0/1 (PKU has no ties). Extra columns (``is_response_0_safe``, harm categories,
    sources, ...) are dropped.
    """
    objectives = check_objectives(objectives)
    if len(objectives) != 2:
        raise ValueError(
            f"PKU-SafeRLHF has two labels (better_response_id, safer_response_id), so it needs "
            f"two objective names (helpfulness first, harmlessness second), got {objectives}"
        )
    dataset = read_source(source)
    _require_columns(dataset, PKU_COLUMNS, "PKU-SafeRLHF")
    helpful, harmless = objectives
    labels = {
        helpful: _pku_ids(dataset, "better_response_id"),
        harmless: _pku_ids(dataset, "safer_response_id"),
    }
    return make_preference_dataset(
        _column(dataset, "prompt"),
        _column(dataset, "response_0"),
        _column(dataset, "response_1"),
        labels,
    )


def _pku_ids(dataset: Dataset, name: str) -> list[int]:
    ids = _column(dataset, name)
    for row, value in enumerate(ids):
        if isinstance(value, bool) or value not in (0, 1):
            raise ValueError(
                f"PKU-SafeRLHF column {name!r}, row {row}: expected 0 or 1, got {value!r}"
            )
    return ids


# --- per-objective chosen/rejected sets (HH-RLHF style) ----------------------------------------
def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH transcripts into ``(prompt, chosen_response, rejected_response)``.

    Anthropic HH stores each pair as two full transcripts ``"\\n\\nHuman: ...\\n\\nAssistant:
    ..."`` that differ only in the last assistant turn. The prompt is everything up to *and
    including* the last ``"\\n\\nAssistant:"``, and each response is the rest verbatim
    (usually with its leading space), so ``prompt + response`` gives back the transcript
    exactly and the prompt ends where a model would start generating.
    """
    prompt_chosen = _prompt_of_transcript(chosen, "chosen")
    prompt_rejected = _prompt_of_transcript(rejected, "rejected")
    if prompt_chosen != prompt_rejected:
        raise ValueError(
            "chosen and rejected transcripts do not share the conversation up to the last "
            f"{ASSISTANT_TURN!r}: chosen has {_preview(prompt_chosen)}, rejected has "
            f"{_preview(prompt_rejected)}"
        )
    start = len(prompt_chosen)
    return prompt_chosen, chosen[start:], rejected[start:]


def _prompt_of_transcript(transcript: str, which: str) -> str:
    if not isinstance(transcript, str):
        raise ValueError(f"{which} must be a transcript string, got {transcript!r}")
    cut = transcript.rfind(ASSISTANT_TURN)
    if cut < 0:
        raise ValueError(
            f"{which} transcript has no {ASSISTANT_TURN!r} turn: {_preview(transcript)}"
        )
    return transcript[: cut + len(ASSISTANT_TURN)]


def _preview(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else "..." + text[-limit:])


def load_per_objective_pairs(sources: Mapping[str, Source]) -> Dataset:
    """One chosen/rejected set per objective -> one schema dataset, objectives in dict order.

    Each set has columns ``prompt, chosen, rejected`` (responses only), or HH's
    ``chosen, rejected`` transcripts, split by :func:`split_transcripts`. A row from the
    ``o`` set gets response_0 = chosen, response_1 = rejected, ``preferred_o`` = 0 and
    ``TIE`` (-1) for every other objective, which that pair says nothing about.
    """
    if not isinstance(sources, Mapping):
        raise TypeError(
            "load_per_objective_pairs needs a dict {objective: source}, e.g. "
            "{'helpful': 'helpful.jsonl', 'harmless': 'harmless.jsonl'}, "
            f"got {type(sources).__name__}"
        )
    objectives = check_objectives(list(sources))
    prompts: list[str] = []
    chosen: list[str] = []
    rejected: list[str] = []
    labels: dict[str, list[int]] = {name: [] for name in objectives}
    for objective in objectives:
        set_prompts, set_chosen, set_rejected = _read_pairs(sources[objective], objective)
        prompts += set_prompts
        chosen += set_chosen
        rejected += set_rejected
        for name in objectives:
            labels[name] += [0 if name == objective else TIE] * len(set_prompts)
    return make_preference_dataset(prompts, chosen, rejected, labels)


def _read_pairs(source: Source, objective: str) -> tuple[list[str], list[str], list[str]]:
    """``(prompts, chosen, rejected)`` of one set, from either accepted layout."""
    dataset = read_source(source)
    layout = f"chosen/rejected set for {objective!r}"
    _require_columns(dataset, HH_COLUMNS, layout)
    if "prompt" in dataset.column_names:
        _require_columns(dataset, PAIR_COLUMNS, layout)
        return _column(dataset, "prompt"), _column(dataset, "chosen"), _column(dataset, "rejected")
    prompts, chosen, rejected = [], [], []
    for row, pair in enumerate(zip(_column(dataset, "chosen"), _column(dataset, "rejected"))):
        try:
            prompt, chosen_response, rejected_response = split_transcripts(*pair)
        except ValueError as error:
            raise ValueError(f"{layout}, row {row}: {error}") from error
        prompts.append(prompt)
        chosen.append(chosen_response)
        rejected.append(rejected_response)
    return prompts, chosen, rejected


# --- the align schema itself -------------------------------------------------------------------
def load_schema(source: Source, objectives: Sequence[str] | None = None) -> Dataset:
    """A dataset already in align's schema: a JSONL file, another file, or a Dataset."""
    if isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() == ".jsonl":
        return load_jsonl(source, objectives)
    dataset = read_source(source)
    validate_preference_dataset(dataset, objectives)
    return dataset


# --- dispatch ----------------------------------------------------------------------------------
def load_preference_data(source: Any, layout: str = "auto", **kwargs: Any) -> Dataset:
    """Load ``source`` in a named layout, or detect the layout from its columns (``"auto"``).

    Layouts: ``"schema"`` (align's own), ``"pku-saferlhf"``, ``"per-objective"`` (a dict
    ``{objective: source}``). ``kwargs`` go to the layout's loader (e.g. ``objectives``).
    """
    try:
        if layout == "auto":
            layout = detect_layout(source)
        if layout == "schema":
            return load_schema(source, **kwargs)
        if layout == "pku-saferlhf":
            return load_pku_saferlhf(source, **kwargs)
        if layout == "per-objective":
            return load_per_objective_pairs(source, **kwargs)
    except ValueError as error:
        # A check of the contents names the column and row; from a file, name the file too.
        if isinstance(source, (str, os.PathLike)) and str(source) not in str(error):
            raise ValueError(f"{source}: {error}") from error
        raise
    raise ValueError(f"unknown layout {layout!r}; known layouts: {['auto', *LAYOUTS]}")


def detect_layout(source: Any) -> str:
    """Name the layout of ``source`` from its columns; a dict of sources is per-objective."""
    if isinstance(source, Mapping) and not isinstance(source, DatasetDict):
        return "per-objective"
    columns = list(read_source(source).column_names)
    if all(name in columns for name in TEXT_COLUMNS) and any(
        name.startswith(PREFERRED_PREFIX) for name in columns
    ):
        return "schema"
    if all(name in columns for name in PKU_COLUMNS):
        return "pku-saferlhf"
    hint = ""
    if all(name in columns for name in HH_COLUMNS):
        hint = (
            "; this looks like one chosen/rejected set: pass a dict {objective: source} with "
            "layout='per-objective'"
        )
    raise ValueError(
        f"cannot tell the layout of data with columns {columns}; known layouts: "
        f"'schema' ({list(TEXT_COLUMNS)} + {PREFERRED_PREFIX}<objective>...), "
        f"'pku-saferlhf' ({list(PKU_COLUMNS)}), 'per-objective' (a dict of sets with "
        f"{list(PAIR_COLUMNS)} or {list(HH_COLUMNS)}){hint}"
    )


# --- splitting ---------------------------------------------------------------------------------
def train_test_split_pairs(
    dataset: Dataset, test_size: float | int = 0.1, seed: int = 0
) -> DatasetDict:
    """A reproducible ``{"train", "test"}`` split: the same seed always gives the same rows.

    When prompts repeat (several pairs per prompt), the split is by prompt — ``test_size`` is
    then the share (or number) of prompts held out — so no held-out prompt was seen in
    training.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer so the split is reproducible, got {seed!r}")
    prompts = dataset["prompt"]
    unique = sorted(set(prompts))
    if len(unique) == len(prompts):
        return dataset.train_test_split(test_size=test_size, seed=seed)
    split = Dataset.from_dict({"prompt": unique}).train_test_split(test_size=test_size, seed=seed)
    held = set(split["test"]["prompt"])
    test = [i for i, prompt in enumerate(prompts) if prompt in held]
    train = [i for i, prompt in enumerate(prompts) if prompt not in held]
    return DatasetDict({"train": dataset.select(train), "test": dataset.select(test)})
