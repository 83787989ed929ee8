"""COCO detection json: found in a dataset folder, validated entry by entry, read into a DetectionDataset."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from nasquant.checks import is_finite_number, is_int, quoted
from nasquant.data.detection import DetectionDataset, read_text
from nasquant.errors import NasquantError


def find_coco_json(root: Path, split: str) -> Path | None:
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


def from_coco_json(json_path: Path, images: str | os.PathLike | None, split: str) -> DetectionDataset:
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
