"""Turn what a user passes as ``source`` (file, folder, glob, list) into image paths."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path

from nasquant.errors import NasquantError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


def image_files(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Image paths from a file, a folder (sorted, non-recursive), a glob pattern, or a list of those."""
    if not isinstance(source, str | os.PathLike):
        return [path for item in source for path in image_files(item)]
    text = os.fspath(source)
    path = Path(text)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise NasquantError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
        return found
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise NasquantError(
                f"{path} is not an image file (expected one of {', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        return [path]
    if glob.has_magic(text):
        found = sorted(Path(p) for p in glob.glob(text) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise NasquantError(f"no images match {text}")
        return found
    raise NasquantError(f"no such image, folder or pattern: {text}")
