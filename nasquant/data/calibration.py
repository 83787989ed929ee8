"""Which images calibrate a model: a reproducible selection, and the overlap check against validation."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from nasquant.data.datasets import DetectionDataset
from nasquant.errors import NasquantError


def read_image_list(path: str | os.PathLike) -> list[str]:
    """File names, one per line; blank lines and ``#`` comments ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise NasquantError(f"cannot read calibration image list {path}: {exc.strerror or exc}") from exc
    names = [line.split("#", 1)[0].strip() for line in lines]
    return [name for name in names if name]


def select_calibration_images(
    dataset: DetectionDataset,
    *,
    num_images: int,
    seed: int = 0,
    image_list: str | os.PathLike | None = None,
) -> DetectionDataset:
    """A reproducible subset of ``dataset`` for calibration.

    With ``image_list``, exactly those files (in the list's order, all of them must exist); without
    it, ``num_images`` drawn by a seeded permutation of the file names sorted, so the same folder and
    seed give the same images on every machine. Fewer images than asked is an error, not a surprise.
    """
    if num_images < 1:
        raise NasquantError(f"calibration.num_images must be at least 1, got {num_images}")
    by_name = {path.name: index for index, path in enumerate(dataset.image_paths)}
    if image_list is not None:
        wanted = read_image_list(image_list)
        missing = [name for name in wanted if name not in by_name]
        if missing:
            raise NasquantError(
                f"{len(missing)} images of {image_list} are not in {dataset.name} (first: {missing[0]})"
            )
        chosen = [by_name[name] for name in wanted[:num_images]]
    else:
        names = sorted(by_name)
        order = np.random.default_rng(seed).permutation(len(names))[:num_images]
        chosen = [by_name[names[i]] for i in order]
    if len(chosen) < num_images:
        raise NasquantError(
            f"calibration wants {num_images} images but {image_list or dataset.name} offers {len(chosen)}; "
            "lower calibration.num_images"
        )
    return replace(
        dataset,
        name=f"{dataset.name} (calibration subset)",
        image_paths=[dataset.image_paths[i] for i in chosen],
        image_ids=[dataset.image_ids[i] for i in chosen],
        coco=None,
    )


def _digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def overlapping_images(calibration: Sequence[Path], validation: Sequence[Path]) -> list[tuple[Path, Path]]:
    """Pairs (calibration image, validation image) with identical bytes — copies and renames included."""
    seen = {_digest(path): path for path in validation}
    return [(path, seen[digest]) for path in calibration if (digest := _digest(path)) in seen]


def check_no_overlap(calibration: Sequence[Path], validation: Sequence[Path], *, allow: bool = False) -> None:
    """Refuse to calibrate on validation images: that inflates the INT8 numbers."""
    pairs = overlapping_images(calibration, validation)
    if pairs and not allow:
        calib, val = pairs[0]
        raise NasquantError(
            f"{len(pairs)} calibration images are also validation images (e.g. {calib} = {val}); "
            "calibrate on other images or set calibration.allow_overlap: true"
        )
