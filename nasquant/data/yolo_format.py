"""Ultralytics YOLO format: a data YAML, its image lists and normalized label files, read into a
DetectionDataset with COCO-format ground truth."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from nasquant.checks import is_int, quoted
from nasquant.data.detection import DEFAULT_WORKERS, DetectionDataset, read_text
from nasquant.data.sources import IMAGE_SUFFIXES
from nasquant.errors import NasquantError
from nasquant.safe_yaml import load_yaml


def from_yolo_yaml(yaml_path: Path, split: str) -> DetectionDataset:
    config = load_yaml(read_text(yaml_path, "data yaml"), f"data yaml {yaml_path}")
    if not isinstance(config, dict):
        raise NasquantError(f"{yaml_path} is not an Ultralytics data yaml (expected a mapping)")
    if not config.get(split):
        keys = ", ".join(k for k in ("train", "val", "test") if config.get(k)) or "none"
        raise NasquantError(f"{yaml_path} has no {split!r} split (splits present: {keys})")
    names = _yolo_names(yaml_path, config)
    # Unlike Ultralytics (which resolves it under its datasets dir), a relative `path` is read
    # relative to the yaml itself, so a dataset folder can be moved or shared as a whole.
    if not isinstance(config.get("path") or ".", str):
        raise NasquantError(f"{yaml_path}: 'path' must be a folder path")
    root = Path(os.path.expanduser(config.get("path") or "."))
    if not root.is_absolute():
        root = yaml_path.parent / root
    entries = config[split] if isinstance(config[split], list) else [config[split]]
    if not all(isinstance(entry, str) for entry in entries):
        raise NasquantError(f"{yaml_path}: the {split!r} split must be a path or a list of paths")
    paths = sorted({p for entry in entries for p in _yolo_image_list(yaml_path, root, entry)})
    if not paths:
        raise NasquantError(f"{yaml_path}: the {split!r} split has no images")

    sizes = _image_sizes(paths)
    images, annotations = [], []
    for image_id, (image_path, (height, width)) in enumerate(zip(paths, sizes, strict=True), start=1):
        images.append({"id": image_id, "file_name": str(image_path), "height": height, "width": width})
        for class_index, x, y, w, h in _yolo_labels(_label_path(image_path), len(names), height, width):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": class_index + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    # Category id = class index + 1: COCO reserves 0, and it keeps the contiguous<->id map trivial.
    categories = [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(names)]
    return DetectionDataset(
        name=f"{yaml_path} ({split})",
        image_paths=paths,
        image_ids=list(range(1, len(paths) + 1)),
        class_names=names,
        category_ids=[c["id"] for c in categories],
        coco={"images": images, "annotations": annotations, "categories": categories},
    )


def _yolo_names(yaml_path: Path, config: dict) -> list[str]:
    raw, nc = config.get("names"), config.get("nc")
    if nc is not None and not (is_int(nc) and nc >= 1):
        raise NasquantError(f"{yaml_path}: 'nc' must be a positive integer, got {quoted(nc)}")
    if raw is None:
        if nc is None:
            raise NasquantError(f"{yaml_path} has neither 'names' nor a positive 'nc'")
        return [f"class{i}" for i in range(nc)]
    if isinstance(raw, dict):
        if not all(is_int(k) for k in raw) or sorted(raw) != list(range(len(raw))):
            raise NasquantError(f"{yaml_path}: 'names' keys must be the class indices 0..N-1")
        values = [raw[i] for i in range(len(raw))]
    elif isinstance(raw, list):
        values = raw
    else:
        raise NasquantError(f"{yaml_path}: 'names' must be a list or an index -> name mapping")
    if not all(isinstance(name, str | int | float) and not isinstance(name, bool) for name in values):
        raise NasquantError(f"{yaml_path}: every class name must be a string")
    names = [str(name) for name in values]
    if not names:
        raise NasquantError(f"{yaml_path}: 'names' is empty")
    if nc is not None and nc != len(names):
        raise NasquantError(f"{yaml_path}: nc is {nc} but 'names' has {len(names)} entries")
    return names


def _yolo_image_list(yaml_path: Path, root: Path, entry: str) -> list[Path]:
    location = Path(os.path.expanduser(entry))
    if not location.is_absolute():
        location = root / location
    if location.is_dir():
        return [p for p in location.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if location.is_file() and location.suffix.lower() == ".txt":
        listed = []
        for line in read_text(location, "image list").splitlines():
            if line.strip():
                # Relative entries ("./images/x.jpg") are relative to the list file's folder.
                image = Path(line.strip())
                listed.append(image if image.is_absolute() else location.parent / image)
        missing = [p for p in listed if not p.is_file()]
        if missing:
            raise NasquantError(f"{location} lists {len(missing)} missing images (first: {missing[0]})")
        return listed
    if location.is_file() and location.suffix.lower() in IMAGE_SUFFIXES:
        return [location]
    raise NasquantError(f"{yaml_path}: split path {location} does not exist (or is not a folder/.txt list)")


def _label_path(image_path: Path) -> Path:
    # Ultralytics' rule: swap the last "images" directory for "labels" and the suffix for .txt.
    parts = list(image_path.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _yolo_labels(
    label_path: Path, num_classes: int, height: int, width: int
) -> list[tuple[int, float, float, float, float]]:
    """``(class, x, y, w, h)`` boxes in pixels; a missing label file means an image without objects."""
    if not label_path.is_file():
        return []
    boxes = []
    for line_no, line in enumerate(read_text(label_path, "label file").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label_path}:{line_no}"
        # 5 fields: class cx cy w h; 7+ with an odd count: class x1 y1 x2 y2 ... (a polygon, boxed).
        if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
            raise NasquantError(f"{where}: expected 'class cx cy w h' (normalized), got {line.strip()!r}")
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise NasquantError(f"{where}: non-numeric value in {line.strip()!r}") from None
        if not values[0].is_integer() or values[0] < 0:
            raise NasquantError(f"{where}: class must be a non-negative integer, got {fields[0]}")
        class_index = int(values[0])
        if class_index >= num_classes:
            raise NasquantError(f"{where}: class {class_index} but the dataset has {num_classes} classes")
        coords = np.array(values[1:])
        if not np.all((coords >= 0.0) & (coords <= 1.0)):
            raise NasquantError(f"{where}: coordinates must be normalized to [0, 1], got {line.strip()!r}")
        if len(fields) == 5:
            cx, cy, w, h = coords
            x1, y1 = cx - w / 2, cy - h / 2
        else:
            xs, ys = coords[0::2], coords[1::2]
            x1, y1, w, h = xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()
        if w <= 0 or h <= 0:  # the COCO rule: no degenerate ground truth
            raise NasquantError(f"{where}: the box has zero width or height: {line.strip()!r}")
        boxes.append(
            (class_index, float(x1 * width), float(y1 * height), float(w * width), float(h * height))
        )
    return boxes


def _image_size(path: Path) -> tuple[int, int]:
    # Decoded, not parsed from the header: OpenCV applies EXIF rotation, so the decoded size is
    # the one the normalized labels and our preprocessing refer to. Grayscale decodes faster.
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise NasquantError(f"cannot decode image {path} (corrupt or unsupported format)")
    return int(image.shape[0]), int(image.shape[1])


def _image_sizes(paths: list[Path]) -> list[tuple[int, int]]:
    with ThreadPoolExecutor(max_workers=DEFAULT_WORKERS) as pool:
        return list(pool.map(_image_size, paths))
