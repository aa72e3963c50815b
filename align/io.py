"""Atomic writes: a file or folder appears complete under its final name, or not at all.

Checkpoints, caches, merged models and reports are written under a temporary name beside the
target and renamed into place, so a run killed mid-write never leaves something that looks done.
Each staging folder records its owner (host, pid, process start time); the next write of the same
target removes staging folders whose owner is gone, or adopts one to resume from it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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


#: A file inside every staging folder naming its owner (host, pid, process start); removed just
#: before the folder is renamed into place, so finished results never carry it.
STAGING_MARKER = ".align-staging.json"


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux ``/proc``), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) counts from after the parenthesised command name, which may hold spaces.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _owner_record() -> dict:
    import socket

    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid)}


#: Staging folders this process is writing now (a folder it left after Ctrl-C is not among them).
_ACTIVE: set[str] = set()


def _owner_is_gone(record: dict, folder: Path) -> bool:
    """Whether the writer that recorded ``record`` has stopped: its process has ended, or it is
    this process and the folder is no longer being written (left after a Ctrl-C). Only judged
    for this host."""
    import socket

    if record.get("host") != socket.gethostname():
        return False  # another machine's process (a shared filesystem): cannot tell, keep it
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid() and record.get("start") == _process_start(pid):
        return str(folder.resolve()) not in _ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, someone else's
    start = record.get("start")
    return start is not None and _process_start(pid) not in (None, start)  # pid reused


def _mark_staging(folder: Path) -> None:
    import json

    (folder / STAGING_MARKER).write_text(json.dumps(_owner_record()) + "\n")


def staging_folders(target: str | os.PathLike) -> list[Path]:
    """The staging folders of :func:`atomic_directory` beside ``target`` (any owner)."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = f".{glob.escape(target.name)}.tmp-*"
    return sorted(p for p in target.parent.glob(pattern) if p.is_dir())


def stale_staging(target: str | os.PathLike) -> list[Path]:
    """Staging folders beside ``target`` whose writer is gone (killed, crashed, interrupted).

    A folder counts as stale only when its :data:`STAGING_MARKER` names a process on this host
    that no longer runs; unmarked folders (older versions, other tools) are left alone.
    """
    import json

    stale = []
    for folder in staging_folders(target):
        try:
            record = json.loads((folder / STAGING_MARKER).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and _owner_is_gone(record, folder):
            stale.append(folder)
    return stale


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike,
    *,
    overwrite: bool = False,
    adopt: Callable[[Path], bool] | None = None,
    keep_on_interrupt: bool = False,
) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; rename it to ``target`` on success.

    If ``target`` already exists and ``overwrite`` is false, the finished folder is discarded
    (another process won the race to produce the same result), which is what caches want.

    Staging folders left beside ``target`` by a process that is gone (:func:`stale_staging`) are
    removed first — or, when ``adopt(folder)`` says so for one of them, that one is taken over
    and yielded with what it already holds (a sweep resumes from the outputs it had finished).
    With ``keep_on_interrupt``, a ``KeyboardInterrupt`` / ``SystemExit`` leaves the staging folder
    in place for a re-run to adopt (in this process or another: it is stale as soon as nothing
    writes it); any other error removes it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    for stale in stale_staging(target):
        if tmp is None and adopt is not None and adopt(stale):
            claimed = stale.with_name(f"{stale.name.split('.tmp-')[0]}.tmp-resumed-{os.getpid()}")
            claimed = claimed.with_name(f"{claimed.name}-{os.urandom(3).hex()}")
            try:
                stale.rename(claimed)  # atomic: of two re-runs, one takes it over
            except OSError:
                continue
            _mark_staging(claimed)
            tmp = claimed
            continue
        shutil.rmtree(stale, ignore_errors=True)
    if tmp is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        _usual_mode(tmp, 0o777)
        _mark_staging(tmp)
    active = str(tmp.resolve())
    _ACTIVE.add(active)
    try:
        yield tmp
        (tmp / STAGING_MARKER).unlink(missing_ok=True)
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
    except (KeyboardInterrupt, SystemExit):
        if not keep_on_interrupt:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.is_dir() and not (tmp / STAGING_MARKER).exists():
            _mark_staging(tmp)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _ACTIVE.discard(active)


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
#: ...less the Trainer's pickled arguments: they hold the run's output folder, so the same
#: training in another folder would otherwise fingerprint differently.
_NOT_CONTENT = ("training_args.bin",)


def content_digest(path: str | os.PathLike) -> str:
    """A sha256 of what a file, or the weights and records in a model folder, contain.

    For a folder: the top-level weight, config, tokenizer and training-record files (names and
    bytes), so an adapter retrained in place gets a new digest while its path stays the same.
    Sub-folders (a run's ``checkpoint-N``) are not part of what the folder computes.
    """
    import hashlib

    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():  # a dataset or a single weights file: its bytes, whatever its name
        files = [path]
    else:
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix in _CONTENT_SUFFIXES and p.name not in _NOT_CONTENT
        )
    if not files:
        raise FileNotFoundError(f"{path} holds no model files to fingerprint")
    for file in files:
        if file is not path:
            digest.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
