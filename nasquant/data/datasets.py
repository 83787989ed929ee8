"""Detection datasets from a COCO json, an Ultralytics data YAML or a plain image folder.

Whatever the source, the result is one :class:`DetectionDataset`: image paths with COCO image ids,
the class list in contiguous order with each class's COCO category id, and the ground truth as a
COCO-format dict (``None`` for an unlabeled folder), which is what pycocotools evaluates.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nasquant.data.coco_format import find_coco_json, from_coco_json
from nasquant.data.detection import DEFAULT_WORKERS, Batch, DetectionDataset
from nasquant.data.hub_datasets import fetch_known_dataset, known_dataset
from nasquant.data.preprocess import ImageTransform, Preprocess, preprocess, read_image
from nasquant.data.sources import IMAGE_SUFFIXES, image_files
from nasquant.data.yolo_format import from_yolo_yaml
from nasquant.errors import NasquantError

DATASET_KINDS = ("auto", "coco", "yolo", "images")


def load_dataset(
    path: str | os.PathLike,
    *,
    split: str = "val",
    images: str | os.PathLike | None = None,
    kind: str = "auto",
) -> DetectionDataset:
    """Load a dataset, detecting its kind from ``path`` (or checking it is ``kind``).

    - ``coco``: a COCO json (``instances_val2017.json``, ``annotations.json``), its images found in
      ``images`` when given, else a sibling ``images/`` folder, else the COCO layout ``<root>/annotations/
      instances_<split>.json`` with ``<root>/<split>/`` or ``<root>/images/<split>/``; or a dataset
      folder holding ``annotations/instances_<split>*.json`` or ``annotations.json``;
    - ``yolo``: an Ultralytics data YAML, read at ``split``;
    - ``images``: a folder of images (or one with an ``images/`` subfolder): unlabeled, for calibration.

    A name from :data:`~nasquant.data.hub_datasets.KNOWN_DATASETS` (``coco8.yaml``, ``coco128.yaml``)
    that is not a local file is Ultralytics' dataset of that name, downloaded into the cache on first use.

    Every image a COCO json lists is evaluated, including those without annotations, as pycocotools
    does (super-gradients' COCO dataset skips them: 4952 of COCO's 5000 val images remain there).
    """
    if kind not in DATASET_KINDS:
        raise NasquantError(f"unknown dataset format {kind!r}; expected one of {', '.join(DATASET_KINDS)}")
    source = Path(path)
    if not source.exists() and known_dataset(path) is not None:
        # Ultralytics' docs say data="coco8.yaml"; with no such local file, that is its sample dataset.
        source = fetch_known_dataset(os.fspath(path))
    if not source.exists():
        raise NasquantError(f"dataset not found: {source}")
    if images is not None and not (source.suffix.lower() == ".json" or source.is_dir()):
        raise NasquantError(f"an images folder can only accompany a COCO json, not {source}")
    detected, target = _detect(source, split, images)
    if kind not in ("auto", detected) and not (kind == "images" and source.is_dir()):
        raise NasquantError(f"{source} looks like a {detected} dataset, not {kind}")
    if kind == "images" or detected == "images":
        return _from_folder(source)
    if detected == "yolo":
        return from_yolo_yaml(target, split)
    return from_coco_json(target, images, split)


def _detect(source: Path, split: str, images: str | os.PathLike | None) -> tuple[str, Path]:
    """The kind of dataset at ``source`` and the file (or folder) to read it from."""
    if source.is_file():
        suffix = source.suffix.lower()
        if suffix == ".json":
            return "coco", source
        if suffix in (".yaml", ".yml"):
            return "yolo", source
        raise NasquantError(
            f"unsupported dataset file {source}: expected a COCO .json, an Ultralytics .yaml or an image folder"
        )
    annotations = find_coco_json(source, split)
    if annotations is not None:
        return "coco", annotations
    if images is not None:
        raise NasquantError(
            f"no COCO json (annotations/instances_{split}*.json or annotations.json) in {source}"
        )
    return "images", source


# --------------------------------------------------------------------------------------------------
# Plain image folder


def _from_folder(folder: Path) -> DetectionDataset:
    has_images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())
    if not has_images and (folder / "images").is_dir():
        folder = folder / "images"
    paths = image_files(folder)
    return DetectionDataset(
        name=str(folder),
        image_paths=paths,
        image_ids=list(range(1, len(paths) + 1)),
        class_names=[],
        category_ids=[],
        coco=None,
    )


# --------------------------------------------------------------------------------------------------
# Batching


def iter_batches(
    dataset: DetectionDataset,
    spec: Preprocess,
    batch_size: int,
    *,
    progress: str | None = None,
    workers: int = DEFAULT_WORKERS,
) -> Iterator[Batch]:
    """Read and preprocess the dataset in order, ``batch_size`` images at a time.

    The next batch is decoded on ``workers`` threads while the caller runs the model on the current
    one. ``progress`` is the description of a tqdm bar; ``None`` shows none.
    """
    if batch_size < 1:
        raise NasquantError(f"batch size must be at least 1, got {batch_size}")
    total = len(dataset)

    def load(index: int) -> tuple[np.ndarray, ImageTransform]:
        return preprocess(read_image(dataset.image_paths[index]), spec)

    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        tqdm(total=total, desc=progress, unit="img", disable=progress is None) as bar,
    ):

        def submit(start: int) -> list:
            return [pool.submit(load, i) for i in range(start, min(start + batch_size, total))]

        pending = submit(0)
        for start in range(0, total, batch_size):
            current, pending = pending, submit(start + batch_size)
            loaded = [future.result() for future in current]
            bar.update(len(loaded))
            stop = start + len(loaded)
            yield Batch(
                images=np.stack([tensor for tensor, _ in loaded]),
                transforms=[transform for _, transform in loaded],
                image_ids=dataset.image_ids[start:stop],
                paths=dataset.image_paths[start:stop],
            )
