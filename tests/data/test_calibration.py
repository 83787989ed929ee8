"""The calibration/validation overlap guard: copies are caught however they were re-encoded."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest

from nasquant.data.calibration import MAX_HASH_DISTANCE, check_no_overlap, overlapping_images
from nasquant.errors import NasquantError
from tests.shared import shared_path


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
