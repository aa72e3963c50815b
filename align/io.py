"""Atomic writes: a file or folder appears complete under its final name, or not at all.

Checkpoints, caches, merged models and reports are written under a temporary name beside the
target and renamed into place, so a run killed mid-write never leaves something that looks done.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path, base: int) -> None:
    """mkstemp / mkdtemp create private (0600 / 0700) entries; a finished result gets the mode
    a plain open() / mkdir() would have given it."""
    with contextlib.suppress(OSError):
        os.chmod(path, base & ~_umask())


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; rename it to ``target`` on success.

    If ``target`` already exists and ``overwrite`` is false, the finished folder is discarded
    (another process won the race to produce the same result), which is what caches want.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    _usual_mode(tmp, 0o777)
    try:
        yield tmp
        if target.exists():
            if not overwrite:
                shutil.rmtree(tmp)
                return
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                tmp.rename(target)
            except OSError:
                # Lost a race with another writer of the same target: keep theirs.
                if not target.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    _usual_mode(tmp, 0o666)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


#: Files that determine what a model folder computes (weights, configs, training record), and
#: not what merely sits beside it (checkpoints of the run, logs, READMEs).
_CONTENT_SUFFIXES = (".safetensors", ".json", ".bin", ".model", ".txt")


def content_digest(path: str | os.PathLike) -> str:
    """A sha256 of what a file, or the weights and records in a model folder, contain.

    For a folder: the top-level weight, config, tokenizer and training-record files (names and
    bytes), so an adapter retrained in place gets a new digest while its path stays the same.
    Sub-folders (a run's ``checkpoint-N``) are not part of what the folder computes.
    """
    import hashlib

    path = Path(path)
    digest = hashlib.sha256()
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _CONTENT_SUFFIXES)
    )
    if not files:
        raise FileNotFoundError(f"{path} holds no model files to fingerprint")
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
