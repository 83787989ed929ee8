"""Detection datasets from a COCO json, an Ultralytics data YAML or a plain image folder.

Whatever the source, the result is one :class:`DetectionDataset`: image paths with COCO image ids,
the class list in contiguous order with each class's COCO category id, and the ground truth as a
COCO-format dict (``None`` for an unlabeled folder), which is what pycocotools evaluates.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from nasquant.checks import is_finite_number, is_int, quoted
from nasquant.data.preprocess import ImageTransform, Preprocess, preprocess, read_image
from nasquant.data.sources import IMAGE_SUFFIXES, image_files
from nasquant.errors import NasquantError
from nasquant.safe_yaml import load_yaml

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

    Every image a COCO json lists is evaluated, including those without annotations, as pycocotools
    does (super-gradients' COCO dataset skips them: 4952 of COCO's 5000 val images remain there).
    """
    if kind not in DATASET_KINDS:
        raise NasquantError(f"unknown dataset format {kind!r}; expected one of {', '.join(DATASET_KINDS)}")
    source = Path(path)
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
        return _from_yolo_yaml(target, split)
    return _from_coco_json(target, images, split)


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
    annotations = _find_coco_json(source, split)
    if annotations is not None:
        return "coco", annotations
    if images is not None:
        raise NasquantError(
            f"no COCO json (annotations/instances_{split}*.json or annotations.json) in {source}"
        )
    return "images", source


# --------------------------------------------------------------------------------------------------
# COCO json


def _find_coco_json(root: Path, split: str) -> Path | None:
    found = sorted((root / "annotations").glob(f"instances_{split}*.json"))
    exact = root / "annotations" / f"instances_{split}.json"
    if exact in found:
        return exact
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise NasquantError(
            f"several annotation files match split {split!r} in {root / 'annotations'}: {names}"
        )
    if found:
        return found[0]
    if (root / "annotations.json").is_file():
        return root / "annotations.json"
    others = sorted((root / "annotations").glob("instances_*.json"))
    if others:
        names = ", ".join(p.name for p in others)
        raise NasquantError(f"no annotations for split {split!r} in {root / 'annotations'} (found: {names})")
    return None


def read_text(path: Path, what: str) -> str:
    """A dataset text file (label file, image list, yaml), or one line saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise NasquantError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise NasquantError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _read_coco_json(path: Path) -> dict:
    try:
        data = json.loads(read_text(path, "COCO json"), parse_constant=_refuse_constant)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise NasquantError(f"cannot read COCO json {path}: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise NasquantError(f"{path} is not a COCO detection json: its top level is not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise NasquantError(f"{path} is not a COCO detection json: no {key!r} list")
    if not data["categories"]:
        raise NasquantError(f"{path} has an empty 'categories' list")
    if not data["images"]:
        raise NasquantError(f"{path} lists no images")
    for key, fields in (("images", ("id", "file_name")), ("categories", ("id", "name"))):
        for index, entry in enumerate(data[key]):
            if not isinstance(entry, dict) or any(field not in entry for field in fields):
                raise NasquantError(f"{path}: {key} entry #{index} lacks {' or '.join(fields)}")
            # pycocotools matches detections to ground truth by id equality: "3" or 3.0 would
            # silently match nothing, so ids are JSON integers, as in COCO itself.
            if not is_int(entry["id"]):
                raise NasquantError(
                    f"{path}: {key} entry #{index} has id {quoted(entry['id'])}, not an integer"
                )
            if key == "images" and not (isinstance(entry["file_name"], str) and entry["file_name"]):
                raise NasquantError(f"{path}: images entry #{index} has no file name string")
    image_ids = [image["id"] for image in data["images"]]
    category_ids = {category["id"] for category in data["categories"]}
    if len(set(image_ids)) != len(image_ids):
        raise NasquantError(f"{path} lists the same image id more than once")
    if len(category_ids) != len(data["categories"]):
        raise NasquantError(f"{path} lists the same category id more than once")
    _check_coco_annotations(path, data["annotations"], set(image_ids), category_ids)
    return data


def _refuse_constant(name: str) -> float:
    # Python's json reads NaN and Infinity, which are not JSON and never valid in a COCO file.
    raise ValueError(f"{name} is not a JSON number")


def _check_coco_annotations(
    path: Path, annotations: list, image_ids: set[int], category_ids: set[int]
) -> None:
    """Validate boxes and fill the fields pycocotools' evaluation needs but some exporters omit.

    A box must be four finite numbers with a positive width and height: pycocotools would keep a
    degenerate box as ground truth that no detection can match, lowering every model's recall, so
    it is refused (naming the annotation) rather than evaluated or silently dropped.
    """
    seen_ids: set[int] = set()
    for index, annotation in enumerate(annotations):
        if not isinstance(annotation, dict):
            raise NasquantError(f"{path}: annotation #{index} is not an object")
        label = f"annotation #{index}" + (f" (id {quoted(annotation['id'])})" if "id" in annotation else "")
        for field in ("image_id", "category_id"):
            if not is_int(annotation.get(field)):
                raise NasquantError(
                    f"{path}: {label} has {field} {quoted(annotation.get(field))}, not an integer"
                )
        box = annotation.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(is_finite_number(v) for v in box)):
            raise NasquantError(
                f"{path}: {label} bbox must be [x, y, w, h] of finite numbers, got {quoted(box)}"
            )
        if box[2] <= 0 or box[3] <= 0:
            raise NasquantError(
                f"{path}: {label} has a box of width {box[2]} and height {box[3]}; sizes must be positive "
                "(fix or remove the annotation)"
            )
        if annotation["image_id"] not in image_ids:
            raise NasquantError(
                f"{path}: {label} refers to image id {annotation['image_id']}, which is not listed"
            )
        if annotation["category_id"] not in category_ids:
            raise NasquantError(
                f"{path}: {label} has category id {annotation['category_id']}, which is not listed"
            )
        if "area" in annotation and not (is_finite_number(annotation["area"]) and annotation["area"] >= 0):
            raise NasquantError(f"{path}: {label} has area {quoted(annotation['area'])}, not a number >= 0")
        if annotation.get("iscrowd", 0) not in (0, 1):
            raise NasquantError(f"{path}: {label} has iscrowd {quoted(annotation['iscrowd'])}, not 0 or 1")
        if "id" in annotation:
            # pycocotools indexes annotations by id: a repeated id silently drops ground truth.
            if not is_int(annotation["id"]) or annotation["id"] in seen_ids:
                raise NasquantError(f"{path}: {label} has an id that is not a unique integer")
            seen_ids.add(annotation["id"])
        annotation.setdefault("area", box[2] * box[3])
        annotation.setdefault("iscrowd", 0)
    # Ids for annotations without one, after every given id is known, so none collides.
    next_id = max(seen_ids, default=0) + 1
    for annotation in annotations:
        if "id" not in annotation:
            annotation["id"] = next_id
            next_id += 1


def _coco_images_dir(json_path: Path, first_file: str, split: str) -> Path:
    candidates = [json_path.parent / "images"]
    if json_path.parent.name == "annotations":
        root = json_path.parent.parent
        match = re.fullmatch(r"instances_(.+)", json_path.stem)
        name = match.group(1) if match else split
        candidates += [root / name, root / "images" / name, root / "images"]
    for candidate in candidates:
        if (candidate / first_file).is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise NasquantError(
        f"cannot find the images of {json_path} (looked for {first_file} in {looked}); pass images=FOLDER"
    )


def _from_coco_json(json_path: Path, images: str | os.PathLike | None, split: str) -> DetectionDataset:
    data = _read_coco_json(json_path)
    first_file = data["images"][0]["file_name"]
    if images is None:
        images_dir = _coco_images_dir(json_path, first_file, split)
    else:
        images_dir = Path(images)
        if not images_dir.is_dir():
            raise NasquantError(f"images folder not found: {images_dir}")
    paths = [images_dir / image["file_name"] for image in data["images"]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise NasquantError(
            f"{len(missing)} of the {len(paths)} images listed in {json_path} are missing from "
            f"{images_dir} (first: {missing[0].name})"
        )
    # Contiguous class order is ascending category id: COCO's 80 classes in the order Deci's and
    # Ultralytics' pretrained heads predict them.
    categories = sorted(data["categories"], key=lambda c: c["id"])
    return DetectionDataset(
        name=str(json_path),
        image_paths=paths,
        image_ids=[image["id"] for image in data["images"]],
        class_names=[str(c["name"]) for c in categories],
        category_ids=[c["id"] for c in categories],
        coco=data,
    )


# --------------------------------------------------------------------------------------------------
# Ultralytics YOLO format


def _from_yolo_yaml(yaml_path: Path, split: str) -> DetectionDataset:
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
