"""Which images calibrate a model: a reproducible selection, and the overlap check against validation."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageOps

from nasquant.data.detection import DEFAULT_WORKERS, DetectionDataset, read_text
from nasquant.errors import NasquantError
from nasquant.io import atomic_path


def read_image_list(path: str | os.PathLike) -> list[str]:
    """File names, one per line; blank lines and ``#`` comments ignored."""
    lines = read_text(Path(path), "calibration image list").splitlines()
    names = [line.split("#", 1)[0].strip() for line in lines]
    return [name for name in names if name]


def write_image_list(path: str | os.PathLike, dataset: DetectionDataset, *, header: str) -> Path:
    """Write ``dataset``'s file names in its order, one per line, under ``# header`` lines, atomically:
    the file :func:`read_image_list` reads back to the same images."""
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    with atomic_path(path) as tmp:
        tmp.write_text(comment + "".join(f"{p.name}\n" for p in dataset.image_paths), encoding="utf-8")
    return Path(path)


def select_calibration_images(
    dataset: DetectionDataset,
    *,
    num_images: int,
    seed: int = 0,
    image_list: str | os.PathLike | None = None,
) -> DetectionDataset:
    """A reproducible subset of ``dataset`` for calibration.

    With ``image_list``, the first ``num_images`` of its files (in the list's order, all of them must
    exist). Without it, the seeded draw, which needs no annotations: sort the file names (code-point
    order), take ``numpy.random.default_rng(seed).permutation(len(names))[:num_images]`` and keep that
    order. The same folder and seed give the same images on every machine, and a smaller draw is the
    first part of a larger one (64 images are the first 64 of the 512). Fewer images than asked is an
    error, not a surprise.
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


#: Side of imagehash's DCT hash: 16 x 16 = 256 bits. Measured on coco-mini and shapes: distinct
#: photos differ in at least 92 bits; PNG, JPEG-50, half-size and 2-pixel-cropped copies in at most 20.
_HASH_SIDE = 16
#: Hamming distance up to which two images count as the same picture.
MAX_HASH_DISTANCE = 32
# JPEGs are decoded at a reduced scale (DCT scaling) no smaller than this: the hash needs 64 px.
_DECODE_SIDE = 256
_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint16)


def image_fingerprint(path: Path) -> np.ndarray:
    """The perceptual hash (pHash, 256 bits packed in 32 bytes) of an image's decoded pixels: the same
    for copies, re-encodes and resized versions of a picture."""
    try:
        with Image.open(path) as image:
            image.draft("L", (_DECODE_SIDE, _DECODE_SIDE))
            upright = ImageOps.exif_transpose(image)
            return np.packbits(imagehash.phash(upright, hash_size=_HASH_SIDE).hash)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise NasquantError(f"cannot decode image {path}: {exc}") from None


def _fingerprints(paths: Sequence[Path]) -> np.ndarray:
    with ThreadPoolExecutor(max_workers=DEFAULT_WORKERS) as pool:
        return np.array(list(pool.map(image_fingerprint, paths)), dtype=np.uint8).reshape(len(paths), -1)


def overlapping_images(
    calibration: Sequence[Path], validation: Sequence[Path]
) -> list[tuple[Path, Path, int]]:
    """``(calibration image, validation image, distance)`` for every calibration image that shows a
    validation image: byte copies and renames, but also re-encoded, resized or slightly cropped
    copies (perceptual hashes at most :data:`MAX_HASH_DISTANCE` bits apart)."""
    if not calibration or not validation:
        return []
    reference = _fingerprints(validation)
    pairs = []
    for path, fingerprint in zip(calibration, _fingerprints(calibration), strict=True):
        distances = _POPCOUNT[np.bitwise_xor(reference, fingerprint)].sum(axis=1)
        nearest = int(distances.argmin())
        if distances[nearest] <= MAX_HASH_DISTANCE:
            pairs.append((path, validation[nearest], int(distances[nearest])))
    return pairs


def check_no_overlap(calibration: Sequence[Path], validation: Sequence[Path], *, allow: bool = False) -> None:
    """Refuse to calibrate on validation images (or copies of them): that inflates the INT8 numbers."""
    if allow:
        return
    pairs = overlapping_images(calibration, validation)
    if pairs:
        calib, val, distance = pairs[0]
        raise NasquantError(
            f"{len(pairs)} calibration images are validation images or copies of them (e.g. {calib} shows "
            f"{val}: perceptual hashes {distance} of {_HASH_SIDE**2} bits apart); calibrate on other "
            "images or set calibration.allow_overlap: true"
        )
