"""The multi-objective preference schema: one prompt, two responses, one label per objective.

A preference dataset is a plain :class:`datasets.Dataset` whose columns are, in this order::

    prompt, response_0, response_1, preferred_<objective_1>, ..., preferred_<objective_m>

Each ``preferred_<objective>`` holds 0 or 1 (the response that objective prefers) or
``TIE`` = -1 (a tie, or no label for that objective: the row is skipped when training that
objective). Objectives are named by their columns and ordered by them, so the order that α
(:mod:`align.preference`) speaks is the order of the columns, never a separate list that could
drift out of step. Every public layout (PKU-SafeRLHF, HH-RLHF, ...) is converted into this one
(see :mod:`align.data.loaders`), so trainers only ever read this schema.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, Value

from align.files import check_text_file
from align.io import atomic_file
from align.preference import check_objectives, require_same_objectives

PREFERRED_PREFIX = "preferred_"
TIE = -1
LABELS = (TIE, 0, 1)
TEXT_COLUMNS = ("prompt", "response_0", "response_1")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")

_STRING_DTYPES = frozenset({"string", "large_string"})
_INTEGER_DTYPES = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"})


# --- layout ------------------------------------------------------------------------------------
def preferred_column(objective: str) -> str:
    """The label column of one objective: ``preferred_<objective>``."""
    return PREFERRED_PREFIX + objective


def expected_columns(objectives: Sequence[str]) -> list[str]:
    """The schema's columns, in order, for these objectives."""
    return [*TEXT_COLUMNS, *(preferred_column(name) for name in check_objectives(objectives))]


def schema_features(objectives: Sequence[str]) -> Features:
    """Column types of the schema: strings for the texts, int64 labels.

    int64 is what JSON, CSV and parquet readers produce for integers, so a dataset built here
    and one read from a file compare equal.
    """
    features = {name: Value("string") for name in TEXT_COLUMNS}
    features.update({preferred_column(name): Value("int64") for name in objectives})
    return Features(features)


def objectives_of(dataset: Dataset) -> tuple[str, ...]:
    """The objectives of a preference dataset, read from its ``preferred_*`` columns in order."""
    columns = list(dataset.column_names)
    names = [
        column[len(PREFERRED_PREFIX) :] for column in columns if column.startswith(PREFERRED_PREFIX)
    ]
    if not names:
        raise ValueError(
            f"no {PREFERRED_PREFIX}<objective> label columns among the columns {columns}; "
            f"expected {list(TEXT_COLUMNS)} followed by one {PREFERRED_PREFIX}<objective> "
            f"column per objective (e.g. {PREFERRED_PREFIX}helpful)"
        )
    return check_objectives(names)


# --- validation --------------------------------------------------------------------------------
def validate_preference_dataset(
    dataset: Dataset, objectives: Sequence[str] | None = None
) -> tuple[str, ...]:
    """Check that ``dataset`` follows the schema (and has ``objectives``, if given).

    Checks columns (names and order), column types, that texts are non-empty strings and that
    labels are in {-1, 0, 1}. Returns the dataset's objectives so callers can carry them on.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"expected a datasets.Dataset, got {type(dataset).__name__}"
            + ("; pick one split, e.g. dataset['train']" if hasattr(dataset, "keys") else "")
        )
    found = objectives_of(dataset)
    if objectives is not None:
        require_same_objectives(check_objectives(objectives), found, "expected", "the dataset")
    _check_columns(list(dataset.column_names), expected_columns(found), "preference dataset")
    _check_feature_types(dataset, found)
    columns = dataset.with_format("arrow")[:].to_pydict()
    for name in TEXT_COLUMNS:
        _check_values(name, columns[name], _text_problem)
    for objective in found:
        name = preferred_column(objective)
        _check_values(name, columns[name], _label_problem)
    return found


def _check_columns(found: list[str], expected: list[str], what: str) -> None:
    """Columns must be exactly ``expected``, in order; say what is missing, extra or shuffled."""
    if found == expected:
        return
    missing = [name for name in expected if name not in found]
    extra = [name for name in found if name not in expected]
    details = []
    if missing:
        details.append(f"missing {missing}")
    if extra:
        details.append(f"unexpected {extra}")
    if not details:
        details.append("same columns in a different order")
    raise ValueError(f"{what} has columns {found}, expected {expected} ({'; '.join(details)})")


def _check_feature_types(dataset: Dataset, objectives: tuple[str, ...]) -> None:
    """Catch wrong column types up front (e.g. a CSV label column with blanks reads as float)."""
    for name in TEXT_COLUMNS:
        dtype = _dtype(dataset.features[name])
        if dtype not in _STRING_DTYPES:
            raise ValueError(f"column {name!r} must hold strings, but its type is {dtype}")
    for objective in objectives:
        name = preferred_column(objective)
        dtype = _dtype(dataset.features[name])
        if dtype not in _INTEGER_DTYPES:
            raise ValueError(
                f"label column {name!r} must hold integers in {list(LABELS)}, but its type is "
                f"{dtype} (write -1 for a tie or a missing label, not a blank)"
            )


def _dtype(feature: Any) -> str:
    return feature.dtype if isinstance(feature, Value) else type(feature).__name__


def _text_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, got {value!r}"
    if not value:
        return "must be a non-empty string, got ''"
    return None


def _label_problem(value: Any) -> str | None:
    # bool is an int in Python, but True/False says nothing about *which* response won.
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an integer in {list(LABELS)}, got {value!r}"
    if value not in LABELS:
        return (
            f"must be 0 (response_0 preferred), 1 (response_1 preferred) or {TIE} (tie / "
            f"no label), got {value!r}"
        )
    return None


def _check_values(name: str, values: Sequence[Any], problem_of: Any) -> None:
    """Raise on the first bad value of a column, naming its position and the number of bad ones."""
    problems = [
        (index, problem) for index, value in enumerate(values) if (problem := problem_of(value))
    ]
    if problems:
        index, problem = problems[0]
        more = f" ({len(problems)} bad values in all)" if len(problems) > 1 else ""
        raise ValueError(f"column {name!r}, row {index}: {problem}{more}")


# --- construction ------------------------------------------------------------------------------
def make_preference_dataset(
    prompts: Sequence[str],
    responses_0: Sequence[str],
    responses_1: Sequence[str],
    preferred: Mapping[str, Sequence[int]],
) -> Dataset:
    """Build a validated preference dataset; ``preferred`` maps objective -> labels, in order.

    Values are checked in Python before Arrow sees them, because Arrow would quietly turn
    ``True`` or ``1.0`` into a label.
    """
    objectives = check_objectives(list(preferred))
    columns: dict[str, list] = {
        "prompt": list(prompts),
        "response_0": list(responses_0),
        "response_1": list(responses_1),
    }
    columns.update({preferred_column(name): list(preferred[name]) for name in objectives})
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"all columns need one value per row, got lengths {lengths}")
    for name, values in columns.items():
        problem_of = _text_problem if name in TEXT_COLUMNS else _label_problem
        _check_values(name, values, problem_of)
    dataset = Dataset.from_dict(columns, features=schema_features(objectives))
    validate_preference_dataset(dataset, objectives)
    return dataset


# --- JSONL -------------------------------------------------------------------------------------
def save_preference_dataset(dataset: Dataset, path: str | os.PathLike) -> Path:
    """Write ``dataset`` as JSONL (one row per line, schema field order), atomically.

    The file appears complete under ``path`` or not at all, so an interrupted save never leaves
    a truncated dataset that would load as a smaller one.
    """
    objectives = validate_preference_dataset(dataset)
    fields = expected_columns(objectives)
    columns = dataset.with_format("arrow")[:].to_pydict()
    path = Path(path)
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for values in zip(*(columns[name] for name in fields)):
            handle.write(_record_line(dict(zip(fields, values))))
    return path


def _record_line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def load_jsonl(path: str | os.PathLike, objectives: Sequence[str] | None = None) -> Dataset:
    """Read a preference dataset saved as JSONL with exactly the schema's field names.

    The first record's ``preferred_*`` fields fix the objectives and their order; every record
    must then have exactly the same fields. Blank lines are skipped; line numbers are 1-based.
    """
    path = Path(path)
    check_text_file(path, "no records")  # empty or not UTF-8: said before parsing
    records: list[dict[str, Any]] = []
    fields: list[str] | None = None
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = _parse_line(line, path, number)
            if fields is None:
                fields = _fields_of_first_record(record, path, number, objectives)
            _check_record(record, fields, path, number)
            records.append(record)
    if fields is None:
        raise ValueError(f"{path}: no records; expected one JSON object per line")
    found = [name[len(PREFERRED_PREFIX) :] for name in fields[len(TEXT_COLUMNS) :]]
    return make_preference_dataset(
        [record["prompt"] for record in records],
        [record["response_0"] for record in records],
        [record["response_1"] for record in records],
        {name: [record[preferred_column(name)] for record in records] for name in found},
    )


def _parse_line(line: str, path: Path, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {number}: not valid JSON ({error})") from error
    if not isinstance(record, dict):
        raise ValueError(f"{path}, line {number}: expected a JSON object, got {record!r}")
    return record


def _fields_of_first_record(
    record: dict[str, Any], path: Path, number: int, objectives: Sequence[str] | None
) -> list[str]:
    """The schema fields implied by the first record (JSON key order gives objective order)."""
    names = [key[len(PREFERRED_PREFIX) :] for key in record if key.startswith(PREFERRED_PREFIX)]
    if not names:
        expected = expected_columns(objectives) if objectives is not None else None
        raise ValueError(
            f"{path}, line {number}: no {PREFERRED_PREFIX}<objective> fields; found fields "
            f"{list(record)}, expected "
            + (
                str(expected)
                if expected
                else f"{list(TEXT_COLUMNS)} + {PREFERRED_PREFIX}<objective>..."
            )
        )
    found = check_objectives(names)
    if objectives is not None:
        require_same_objectives(check_objectives(objectives), found, "expected", f"{path}")
    return expected_columns(found)


def _check_record(record: dict[str, Any], fields: list[str], path: Path, number: int) -> None:
    """Fields must be exactly the schema's (in any order: JSON objects are unordered)."""
    if set(record) != set(fields):
        missing = [name for name in fields if name not in record]
        extra = [name for name in record if name not in fields]
        details = ([f"missing {missing}"] if missing else []) + (
            [f"unexpected {extra}"] if extra else []
        )
        raise ValueError(
            f"{path}, line {number}: found fields {list(record)}, expected {fields} "
            f"({'; '.join(details)})"
        )
    for name in fields:
        problem_of = _text_problem if name in TEXT_COLUMNS else _label_problem
        problem = problem_of(record[name])
        if problem:
            raise ValueError(f"{path}, line {number}: field {name!r} {problem}")
