"""Ultralytics' sample datasets by the names its docs use (``data="coco8.yaml"``), fetched on first use.

Each archive comes from Ultralytics' public release assets (or ``$NASQUANT_MIRROR``, as for the
weights) and is unpacked, in Ultralytics' layout (``coco8/images/val``, ``coco8/labels/val``), under
``$NASQUANT_CACHE/datasets/``. Beside it nasquant writes the data yaml from :data:`KNOWN_DATASETS`,
which :mod:`nasquant.data.yolo_format` then reads like any other Ultralytics yaml: COCO-format ground
truth with the 80 classes as contiguous ids.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from nasquant.data.coco_names import COCO_CLASSES
from nasquant.errors import NasquantError
from nasquant.io import PART_SUFFIX, atomic_path
from nasquant.weights.hub import DownloadFailed, cache_dir_default, download, mirrored


@dataclass(frozen=True)
class KnownDataset:
    """Where a dataset's zip lives and what its data yaml says."""

    url: str
    folder: str
    """The archive's top folder, which becomes ``<cache>/datasets/<folder>``."""
    train: str
    """Training images, relative to ``folder``."""
    val: str
    """Validation images, relative to ``folder``."""
    names: tuple[str, ...]
    """Class names in contiguous order (the order of the label files' class indices)."""


_ULTRALYTICS_ASSETS = "https://github.com/ultralytics/assets/releases/download/v0.0.0"

#: Dataset yaml name -> definition, as Ultralytics' own ``cfg/datasets/*.yaml`` describe them.
KNOWN_DATASETS: dict[str, KnownDataset] = {
    # The first 8 images of COCO train2017, 4 for training and 4 for validation.
    "coco8.yaml": KnownDataset(
        f"{_ULTRALYTICS_ASSETS}/coco8.zip", "coco8", "images/train", "images/val", COCO_CLASSES
    ),
    # The first 128 images of COCO train2017; Ultralytics validates on the same 128 images.
    "coco128.yaml": KnownDataset(
        f"{_ULTRALYTICS_ASSETS}/coco128.zip", "coco128", "images/train2017", "images/train2017", COCO_CLASSES
    ),
}


def known_dataset(name: str | os.PathLike) -> KnownDataset | None:
    """The definition ``name`` refers to (a bare file name such as ``coco8.yaml``), else None."""
    return KNOWN_DATASETS.get(os.fspath(name).strip().lower())


def fetch_known_dataset(name: str, *, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The data yaml of the known dataset ``name``, in the cache; the first call downloads and unpacks it.

    The unpacked folder is the cache: once ``<cache>/datasets/<folder>`` exists nothing is downloaded,
    so a copy unpacked there by hand (offline sites) is used as it is.
    """
    known = known_dataset(name)
    if known is None:
        raise NasquantError(f"unknown dataset {name!r}; nasquant can download {', '.join(KNOWN_DATASETS)}")
    root = (Path(cache_dir) if cache_dir is not None else cache_dir_default()) / "datasets"
    if not (root / known.folder).is_dir():
        _install(name, known, root, progress)
    return _write_yaml(root / f"{known.folder}.yaml", known)


def _install(name: str, known: KnownDataset, root: Path, progress: bool) -> None:
    url = mirrored(known.url)
    target = root / known.folder
    root.mkdir(parents=True, exist_ok=True)
    # Download and unpack in a hidden folder beside the final one and rename the result into place:
    # an interrupted, failed or refused download leaves nothing under the final name, and the
    # temporary folder goes away on any error.
    with tempfile.TemporaryDirectory(prefix=f".{known.folder}.", suffix=PART_SUFFIX, dir=root) as tmp:
        archive = Path(tmp) / f"{known.folder}.zip"
        try:
            download(url, archive, progress=progress)
        except DownloadFailed as exc:
            raise NasquantError(
                f"{name}: not cached and {url} could not be downloaded ({exc}); download it and unzip it "
                f"into {root}/ (giving {target / known.val})"
            ) from None
        unpacked = Path(tmp) / "unpacked"
        _safe_extract(archive, unpacked, url)
        if not (unpacked / known.folder).is_dir():
            raise NasquantError(f"{url} does not hold the folder {known.folder}/ that {name} expects")
        try:
            (unpacked / known.folder).rename(target)
        except OSError:
            # Another process installed it meanwhile (renaming onto a non-empty folder fails): use theirs.
            if not target.is_dir():
                raise
    print(f"nasquant: downloaded {url} and unpacked it into {target}", file=sys.stderr)


def _safe_extract(archive: Path, dest: Path, url: str) -> None:
    """Unpack ``archive`` into ``dest``, refusing the whole archive if any entry would land outside it."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            for entry in zipped.namelist():
                if not _stays_inside(entry):
                    raise NasquantError(
                        f"{url}: refusing to unpack an archive whose entry {entry!r} points outside its folder"
                    )
            zipped.extractall(dest)
    except zipfile.BadZipFile as exc:
        raise NasquantError(f"{url} is not a valid zip archive ({exc})") from None


def _stays_inside(entry: str) -> bool:
    # zipfile itself would quietly rewrite such names; a dataset archive never needs them, so one
    # that has them is broken or hostile. Backslashes count as separators (archives made on Windows).
    parts = PurePosixPath(entry.replace("\\", "/")).parts
    return bool(parts) and not entry.startswith(("/", "\\")) and ".." not in parts and ":" not in parts[0]


def _write_yaml(path: Path, known: KnownDataset) -> Path:
    # Rewritten whenever the table changed (a newer nasquant), so the yaml always matches this version.
    lines = [
        f"# Written by nasquant from its definition of this dataset; downloaded from {known.url}",
        f"path: {known.folder}",
        f"train: {known.train}",
        f"val: {known.val}",
        "names:",
        # JSON strings are valid YAML scalars: names with ':' or '#' stay intact.
        *(f"  {index}: {json.dumps(name)}" for index, name in enumerate(known.names)),
    ]
    text = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text() != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return path
