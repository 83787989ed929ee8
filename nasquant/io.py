"""File writing that never leaves a half-written artifact under its final name, and the run-folder lock
that keeps two runs from writing into one folder."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nasquant.errors import NasquantError

#: Suffix of the temporary files :func:`atomic_path` writes (``.<final name>.<random>.part``).
PART_SUFFIX = ".part"


def remove_stale_parts(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files :func:`atomic_path` left in ``folder`` (not below it) when its process
    was killed before it could clean up; returns what was removed. Only for a folder no other live
    process writes into: it cannot tell an orphan from another process's file in progress."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [path for path in folder.glob(f".*{PART_SUFFIX}") if path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` only if the block succeeds.

    Same directory, so the rename is atomic; on any error or Ctrl-C the temporary file is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=PART_SUFFIX, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; the artifact should get the permissions any new file would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, final)
    except OSError as exc:
        # A writer deep in a library (torch's exporter, ...) reports a full disk without a file name.
        if exc.filename is None:
            raise OSError(exc.errno, f"{exc.strerror or exc} while writing", str(final)) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")
    return Path(path)


def _json_default(value: Any) -> Any:
    # numpy scalars and paths appear in metric dicts; make them plain JSON values.
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


#: In a run folder: who holds its lock (JSON), present only while a run holds it or after one was killed.
LOCK_NAME = ".nasquant.lock"


@dataclass(frozen=True)
class RunLock:
    """A held run-folder lock. ``previous`` is the holder record a stopped run left behind (it was
    killed before releasing: the kernel dropped its lock, the record stayed), else None."""

    path: Path
    previous: dict[str, Any] | None


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[RunLock]:
    """Hold an exclusive lock on the run folder ``folder`` for the block, or refuse in one line.

    An ``flock`` on the folder itself: the kernel releases it when the holder exits, however it exits
    (SIGKILL, a container's power loss), so a stale lock never blocks a folder. While held, the record
    ``folder/.nasquant.lock`` says who holds it (pid, host, start, command) for the refusal message; it
    is removed on release, so a record found on taking the lock was left by a run that was killed.
    Works on local file systems; on NFS it depends on the server's lock support.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / LOCK_NAME
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NasquantError(
                f"{folder} is in use by another nasquant run ({describe_holder(_read_holder(record))}); "
                "wait for it to finish or write to another folder (--output)"
            ) from None
        previous = _read_holder(record)
        try:
            write_json(
                record,
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "command": shlex.join(sys.argv)[:300],
                },
            )
            yield RunLock(record, previous)
        finally:
            record.unlink(missing_ok=True)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_holder(record: Path) -> dict[str, Any] | None:
    try:
        with record.open("rb") as file:
            holder = json.loads(file.read(4096))  # a record is ~200 bytes; more is not one
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict[str, Any] | None) -> str:
    """``pid 123 on host vm since 2026-11-28 18:55:02 UTC: nasquant quantize ...`` (what is known)."""
    if not holder:
        return "holder unknown"
    who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('started', '?')}"
    return f"{who}: {holder['command']}" if holder.get("command") else who
