"""The one image preprocessing used by calibration, validation, prediction and export.

Resize so the long side is ``resize`` (aspect kept), centre-pad to ``imgsz`` x ``imgsz``, scale to
[0, 1], CHW float32. The two protocols differ only in the resize target and in how the resized size
is rounded; both are described by :class:`Preprocess`, and :class:`ImageTransform` inverts them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np

from nasquant.artifacts import MAX_INPUT_SIZE, MAX_STRIDE
from nasquant.data.sources import read_image_bgr
from nasquant.errors import NasquantError

PROTOCOLS = ("sg", "letterbox")
ROUNDINGS = ("floor", "round")

# Deci evaluates YOLO-NAS on COCO with the long side resized to 636 inside a 640 canvas.
_SG_RESIZE, _SG_CANVAS = 636, 640


def check_input_size(size: int, what: str = "input size") -> int:
    """``size`` if it is a network input side YOLO-NAS can take (a multiple of 32, 32..8192)."""
    valid = isinstance(size, int) and not isinstance(size, bool) and MAX_STRIDE <= size <= MAX_INPUT_SIZE
    if not valid or size % MAX_STRIDE:
        raise NasquantError(
            f"{what} must be a multiple of {MAX_STRIDE} from {MAX_STRIDE} to {MAX_INPUT_SIZE}, got {size!r}"
        )
    return size


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a network input.

    ``rounding`` is how the resized size is made whole: ``"floor"`` is super-gradients' COCO dataset
    (``int(h * r)``), ``"round"`` is Ultralytics' letterbox and super-gradients' predict pipeline.
    Padding is always centred: ``top = (imgsz - new_h) // 2``, ``left = (imgsz - new_w) // 2``.
    """

    imgsz: int
    resize: int
    pad_value: int = 114
    rounding: str = "floor"

    def __post_init__(self) -> None:
        for name in ("imgsz", "resize", "pad_value"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise NasquantError(f"preprocessing {name} must be an integer, got {value!r}")
        if not 1 <= self.imgsz <= MAX_INPUT_SIZE:
            raise NasquantError(f"image size must be from 1 to {MAX_INPUT_SIZE} pixels, got {self.imgsz}")
        if not 1 <= self.resize <= self.imgsz:
            raise NasquantError(
                f"resize target {self.resize} must be between 1 and the input size {self.imgsz}"
            )
        if not 0 <= self.pad_value <= 255:
            raise NasquantError(f"pad value must be within 0..255, got {self.pad_value}")
        if self.rounding not in ROUNDINGS:
            raise NasquantError(f"unknown rounding {self.rounding!r}; expected one of {', '.join(ROUNDINGS)}")

    @classmethod
    def from_protocol(cls, protocol: str, imgsz: int, *, model_processing: dict | None = None) -> Preprocess:
        """The preprocessing of a named protocol at input size ``imgsz``.

        ``sg``: super-gradients' COCO evaluation (long side 636 of 640, rounded down, as its COCO
        dataset does), or the resize and pad value the checkpoint recorded (``{"resize", "imgsz",
        "pad_value"}``), scaled to ``imgsz`` and rounded to nearest, as super-gradients' own
        ``DetectionLongestMaxSizeRescale`` (the pipeline such a checkpoint records) does.
        ``letterbox``: Ultralytics' (long side ``imgsz``, rounded to nearest).
        """
        if protocol == "sg":
            processing = model_processing or {}
            if "resize" in processing and "imgsz" in processing:
                resize = round(int(processing["resize"]) * imgsz / int(processing["imgsz"]))
                return cls(imgsz, resize, int(processing.get("pad_value", 114)), "round")
            return cls(imgsz, imgsz * _SG_RESIZE // _SG_CANVAS, 114, "floor")
        if protocol == "letterbox":
            return cls(imgsz, imgsz, 114, "round")
        raise NasquantError(
            f"unknown preprocessing protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}"
        )


@dataclass(frozen=True)
class ImageTransform:
    """Where one image landed in the network input, to map boxes between the two frames."""

    orig_h: int
    orig_w: int
    new_h: int
    new_w: int
    pad_top: int
    pad_left: int

    def _scales(self) -> np.ndarray:
        # Per axis: after rounding the resized size, x and y are scaled by slightly different factors.
        sx, sy = self.new_w / self.orig_w, self.new_h / self.orig_h
        return np.array([sx, sy, sx, sy])

    def _offsets(self) -> np.ndarray:
        return np.array([self.pad_left, self.pad_top, self.pad_left, self.pad_top], dtype=np.float64)

    def to_input(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """Boxes (..., 4) xyxy in original-image pixels -> network-input pixels (not clipped)."""
        boxes = np.asarray(boxes_xyxy)
        mapped = boxes.astype(np.float64) * self._scales() + self._offsets()
        return mapped.astype(_float_dtype(boxes))

    def to_original(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """Boxes (..., 4) xyxy in network-input pixels -> original-image pixels, clipped to the image."""
        boxes = np.asarray(boxes_xyxy)
        mapped = (boxes.astype(np.float64) - self._offsets()) / self._scales()
        limits = np.array([self.orig_w, self.orig_h, self.orig_w, self.orig_h], dtype=np.float64)
        return np.clip(mapped, 0.0, limits).astype(_float_dtype(boxes))


def _float_dtype(array: np.ndarray) -> np.dtype:
    # Keep float32 detections float32 (and float64 float64); integer boxes come back as float64.
    return array.dtype if np.issubdtype(array.dtype, np.floating) else np.dtype(np.float64)


def resized_size(height: int, width: int, spec: Preprocess) -> tuple[int, int]:
    """The (height, width) an image of this size is resized to before padding."""
    # Computed as super-gradients does (a float scale, then side * scale) rather than in exact
    # integers, so its rounding quirks match too: int(149 * (636 / 149)) == 635, not 636.
    scale = min(spec.resize / height, spec.resize / width)
    if spec.rounding == "floor":
        new_h, new_w = int(height * scale), int(width * scale)
    else:
        new_h, new_w = round(height * scale), round(width * scale)
    return max(new_h, 1), max(new_w, 1)


def preprocess(image_rgb: np.ndarray, spec: Preprocess) -> tuple[np.ndarray, ImageTransform]:
    """RGB uint8 HxWx3 image -> float32 (3, imgsz, imgsz) in [0, 1] and the transform applied."""
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise NasquantError(f"expected an RGB uint8 HxWx3 image, got {image_rgb.dtype} {image_rgb.shape}")
    height, width = image_rgb.shape[:2]
    new_h, new_w = resized_size(height, width, spec)
    resized = image_rgb
    if (new_h, new_w) != (height, width):
        resized = cv2.resize(image_rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, left = (spec.imgsz - new_h) // 2, (spec.imgsz - new_w) // 2
    canvas = np.full((spec.imgsz, spec.imgsz, 3), spec.pad_value, dtype=np.uint8)
    canvas[top : top + new_h, left : left + new_w] = resized
    tensor = np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32)
    # Divide (not multiply by 1/255) so the values equal super-gradients' image / 255 bit for bit.
    tensor /= np.float32(255)
    return tensor, ImageTransform(height, width, new_h, new_w, top, left)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as RGB uint8 HxWx3 (OpenCV decoding, EXIF orientation applied)."""
    return cv2.cvtColor(read_image_bgr(path), cv2.COLOR_BGR2RGB)
