"""How align reports a bad input: one ``error: …`` line and a non-zero exit status.

The command line (:mod:`align.cli`) and ``python -m align.train`` catch the errors a user can
cause and fix (a missing file, a dataset without label columns, a bad recipe value, broken
YAML, mismatched models, a missing adapter folder) and print their message alone. A traceback
is shown only when asked for, with ``--debug`` or ``ALIGN_DEBUG=1``; an error of any other kind
(a bug) keeps its traceback.
"""

from __future__ import annotations

import os
import sys

DEBUG_VARIABLE = "ALIGN_DEBUG"


class BadFileError(ValueError):
    """A file that is there but cannot be read as what it should be: empty, truncated,
    corrupted, not UTF-8, not valid JSON / safetensors / Parquet... (see :mod:`align.files`).
    The message is ``<path>: <what is wrong>``."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


def debug_requested(flag: bool = False) -> bool:
    """``--debug`` given, or ``ALIGN_DEBUG`` set to anything but empty / 0 / false / no."""
    value = os.environ.get(DEBUG_VARIABLE, "").strip().lower()
    return flag or value not in ("", "0", "false", "no", "off")


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean "bad input", not "bug in align".

    ``ValueError`` covers align's own checks (``RecipeError``, ``MergeConfigError``,
    ``MergeInputError``, ``CheckpointError``, ``BadFileError``, bad α, schema errors) and JSON
    decoding; ``OSError`` covers missing files and folders, ``FileExistsError`` and
    ``ModelLoadError``. Types of modules not loaded yet cannot have been raised, so they are
    only looked up when loaded.
    """
    types: list[type[BaseException]] = [ValueError, OSError, KeyError]
    for module, name in (
        ("yaml", "YAMLError"),
        ("align.adapters.base", "PreferenceNotSetError"),
        ("datasets.exceptions", "DatasetGenerationError"),
    ):
        found = getattr(sys.modules.get(module), name, None)
        if isinstance(found, type) and issubclass(found, BaseException):
            types.append(found)
    return tuple(types)


def yaml_problem(error: BaseException) -> str:
    """A YAML parse error in one line: ``line L, column C: what is wrong``."""
    problem = getattr(error, "problem", None) or getattr(error, "context", None)
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if problem is None:
        return " ".join(str(error).split())
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def describe(error: BaseException) -> str:
    """The message of a user error as one ``error:`` line shows it."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        message = error.args[0]  # str(KeyError) quotes its message
    elif type(error).__module__.startswith("yaml"):
        message = f"not valid YAML: {yaml_problem(error)}"
    else:
        message = str(error).strip()
    if not message:
        message = type(error).__name__
    return message
