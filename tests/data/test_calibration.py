"""Which images calibrate: the seeded draw, image lists, and the calibration/validation overlap guard
(copies are caught however they were re-encoded)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest

from nasquant.data.calibration import (
    MAX_HASH_DISTANCE,
    check_no_overlap,
    overlapping_images,
    read_image_list,
    select_calibration_images,
    write_image_list,
)
from nasquant.data.datasets import load_dataset
from nasquant.errors import NasquantError
from tests.shared import shared_path


@pytest.fixture(scope="module")
def coco_train():
    return load_dataset(shared_path("data", "coco-mini", "train2017"), kind="images")


def _names(dataset) -> list[str]:
    return [p.name for p in dataset.image_paths]


def test_seeded_draw_follows_the_documented_rule(coco_train, tmp_path: Path) -> None:
    # The rule needs only file names: sort them, permute with the seed, keep the first N in that order.
    names = sorted(_names(coco_train))
    expected = [names[i] for i in np.random.default_rng(3).permutation(len(names))[:40]]
    drawn = select_calibration_images(coco_train, num_images=40, seed=3)
    assert _names(drawn) == expected
    # Listing order does not matter (another filesystem, another order), and a smaller draw is a prefix.
    shuffled = dataclasses.replace(coco_train, image_paths=coco_train.image_paths[::-1])
    assert _names(select_calibration_images(shuffled, num_images=40, seed=3)) == expected
    assert _names(select_calibration_images(coco_train, num_images=10, seed=3)) == expected[:10]
    assert _names(select_calibration_images(coco_train, num_images=40, seed=4)) != expected


def test_an_image_list_written_reads_back_to_the_same_images(coco_train, tmp_path: Path) -> None:
    drawn = select_calibration_images(coco_train, num_images=12, seed=0)
    path = write_image_list(tmp_path / "list.txt", drawn, header="12 images\nseed 0")
    assert path.read_text().startswith("# 12 images\n# seed 0\n")
    assert read_image_list(path) == _names(drawn)
    again = select_calibration_images(coco_train, num_images=12, image_list=path)
    assert again.image_paths == drawn.image_paths
    assert _names(select_calibration_images(coco_train, num_images=5, image_list=path)) == _names(drawn)[:5]


def test_a_list_naming_absent_images_or_too_few_is_refused(coco_train, tmp_path: Path) -> None:
    listed = tmp_path / "list.txt"
    listed.write_text("000000000790.jpg\nnot_there.jpg\n")
    with pytest.raises(NasquantError, match=r"1 images of .*list\.txt are not in .*first: not_there\.jpg"):
        select_calibration_images(coco_train, num_images=2, image_list=listed)
    listed.write_text("000000000790.jpg\n")
    with pytest.raises(NasquantError, match=r"wants 2 images but .*list\.txt offers 1"):
        select_calibration_images(coco_train, num_images=2, image_list=listed)
    with pytest.raises(NasquantError, match=r"wants 200 images but .* offers 128"):
        select_calibration_images(coco_train, num_images=200)


@pytest.fixture(scope="module")
def val_images() -> list[Path]:
    return sorted(shared_path("data", "shapes", "val", "images").glob("*.jpg"))


def _copy(source: Path, target: Path, *, scale: float = 1.0, crop: int = 0, quality: int = 95) -> Path:
    image = cv2.imread(str(source))
    if crop:
        image = image[crop:-crop, crop:-crop]
    if scale != 1.0:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    assert cv2.imwrite(str(target), image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return target


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("renamed.png", {}),  # lossless re-encode: the same pixels, other bytes
        ("requality.jpg", {"quality": 50}),
        ("half.jpg", {"scale": 0.5}),
        ("cropped.png", {"crop": 2}),
    ],
)
def test_reencoded_resized_and_cropped_copies_count_as_overlap(
    val_images: list[Path], tmp_path: Path, name: str, kwargs: dict
) -> None:
    copy = _copy(val_images[7], tmp_path / name, **kwargs)
    ((calib, val, distance),) = overlapping_images([copy], val_images)
    assert (calib, val) == (copy, val_images[7]) and distance <= MAX_HASH_DISTANCE
    with pytest.raises(NasquantError, match=r"1 calibration images are validation images or copies of them"):
        check_no_overlap([copy], val_images)
    check_no_overlap([copy], val_images, allow=True)


def test_disjoint_sets_pass(val_images: list[Path]) -> None:
    # The shapes calibration images are other photos with other shapes: no false alarm over 256 x 300 pairs.
    calib = sorted(shared_path("data", "shapes", "calib", "images").glob("*.jpg"))
    assert overlapping_images(calib, val_images) == []
    coco_train = sorted(shared_path("data", "coco-mini", "train2017").glob("*.jpg"))
    coco_val = sorted(shared_path("data", "coco-mini", "val2017").glob("*.jpg"))
    assert overlapping_images(coco_train, coco_val) == []


def test_an_undecodable_image_is_one_line(val_images: list[Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(NasquantError, match=r"cannot decode image .*broken\.jpg"):
        check_no_overlap([broken], val_images)
