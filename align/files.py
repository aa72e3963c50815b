"""Reading the files a user hands align, so that a bad one is one error naming it.

An empty, truncated or corrupted file, or text that is not UTF-8, would otherwise fail deep
inside json, PyYAML, safetensors, datasets or torch with a message that names neither the file
nor the problem (``Expecting value: line 1 column 1``, ``header too large``, ``'utf-8' codec
can't decode byte 0xe9``), sometimes as a traceback. Each reader here checks what it reads and
raises :class:`~align.errors.BadFileError` (``<path>: <what is wrong>``), which the command line
prints as its one ``error:`` line. The checks are cheap: sizes, headers, one decode.
"""

from __future__ import annotations

import codecs
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

from align.errors import BadFileError

# --- text ----------------------------------------------------------------------------------------


def decode_utf8(data: bytes, path: str | os.PathLike) -> str:
    """``data`` as UTF-8 text; else an error giving the first bad byte's line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise BadFileError(
            path, f"not UTF-8 text (byte 0x{data[error.start]:02x} at line {line}, column {column})"
        ) from None


def read_text(path: str | os.PathLike) -> str:
    """A text file's contents, which must be UTF-8 (align writes and expects nothing else)."""
    return decode_utf8(Path(path).read_bytes(), path)


def check_text_file(path: str | os.PathLike, empty: str = "nothing in it") -> None:
    """A text file must be UTF-8 and hold more than white space (``empty`` says what is then
    missing). Read in blocks: data files can be large; only a failure reads it whole again."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    blank = True
    with open(path, "rb") as handle:
        try:
            for block in iter(lambda: handle.read(1 << 20), b""):
                blank = blank and not decoder.decode(block).strip()
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            decode_utf8(Path(path).read_bytes(), path)  # raises, with the line and column
    if blank:
        raise BadFileError(path, f"empty file ({empty})")


def read_json(path: str | os.PathLike, *, expect: type | None = dict) -> Any:
    """A JSON file's value (by default it must be an object)."""
    text = read_text(path)
    if not text.strip():
        raise BadFileError(path, "empty file (expected JSON)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadFileError(
            path, f"not valid JSON ({error.msg}: line {error.lineno}, column {error.colno})"
        ) from None
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "object", list: "list"}.get(expect, expect.__name__)
        raise BadFileError(path, f"expected a JSON {kind}, got a {type(value).__name__}")
    return value


# --- binary formats ------------------------------------------------------------------------------

#: A safetensors header longer than this is a corrupted length field, not a real header.
_MAX_HEADER = 100_000_000


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header of a safetensors file, after checking that the file holds exactly the bytes
    the header describes: a truncated file, or one that is not safetensors, fails here with its
    name, instead of inside the safetensors library ("incomplete metadata, file not fully
    covered") when a tensor is read."""
    path = Path(path)
    size = path.stat().st_size
    bad = "truncated or not a safetensors file"
    if size == 0:
        raise BadFileError(path, "empty file (expected safetensors weights)")
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise BadFileError(path, f"{bad} ({size} bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, _MAX_HEADER):
            raise BadFileError(path, f"{bad} (header of {length} bytes in a {size}-byte file)")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
        end = max(
            (
                int(entry["data_offsets"][1])
                for name, entry in header.items()
                if name != "__metadata__"
            ),
            default=0,
        )
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise BadFileError(path, f"{bad} (its header is not a safetensors header)") from None
    expected = 8 + length + end
    if expected != size:
        raise BadFileError(path, f"{bad} ({size} bytes, its header describes {expected})")
    return header


def check_torch_file(path: str | os.PathLike) -> None:
    """A ``torch.save`` file (optimizer, scheduler, RNG or multi-objective state) is a zip
    archive: a truncated or garbled one fails its zip structure or a member's checksum. Checked
    without unpickling anything."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise BadFileError(path, "empty file (expected a torch.save archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as error:
        raise BadFileError(
            path, f"truncated or corrupted, not a readable torch.save archive ({error})"
        ) from None
    if broken is not None:
        raise BadFileError(path, f"corrupted: its member {broken} fails its checksum")
