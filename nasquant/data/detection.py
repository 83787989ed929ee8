"""The one in-memory form of a detection dataset, whatever file it came from, and the batch a model runs.

Readers of each format (:mod:`nasquant.data.coco_format`, :mod:`nasquant.data.yolo_format`) build it;
:func:`nasquant.data.datasets.load_dataset` chooses the reader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from nasquant.data.preprocess import ImageTransform
from nasquant.errors import NasquantError

# Image decoding (OpenCV releases the GIL) overlaps with the model when spread over a few threads.
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


@dataclass
class DetectionDataset:
    """Images plus (optionally) their ground truth.

    ``class_names[i]`` and ``category_ids[i]`` describe the network's class ``i``; ``image_ids`` are
    aligned with ``image_paths``; ``coco`` is ``{"images", "annotations", "categories"}``.
    """

    name: str
    image_paths: list[Path]
    image_ids: list[int]
    class_names: list[str]
    category_ids: list[int]
    coco: dict | None

    def __len__(self) -> int:
        return len(self.image_paths)

    def first(self, count: int | None) -> DetectionDataset:
        """The first ``count`` images (all for None) with only their ground truth, so that COCO
        evaluation scores exactly the images that were run."""
        if count is None or count >= len(self):
            return self
        keep = set(self.image_ids[:count])
        coco = None
        if self.coco is not None:
            coco = dict(self.coco)
            coco["images"] = [image for image in coco["images"] if image["id"] in keep]
            coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
        return replace(
            self, image_paths=self.image_paths[:count], image_ids=self.image_ids[:count], coco=coco
        )


@dataclass
class Batch:
    """Preprocessed images ``(N, 3, S, S)`` float32 and what is needed to map detections back."""

    images: np.ndarray
    transforms: list[ImageTransform]
    image_ids: list[int]
    paths: list[Path]


def read_text(path: Path, what: str) -> str:
    """A dataset text file (label file, image list, yaml), or one line saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise NasquantError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise NasquantError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
