"""File writing that never leaves a half-written artifact under its final name."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
