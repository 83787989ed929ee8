from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from nasquant.data.coco_names import COCO_CLASSES
from nasquant.data.datasets import iter_batches, load_dataset
from nasquant.data.preprocess import Preprocess, preprocess, read_image
from nasquant.errors import NasquantError
from tests.shared import shared_path

SHAPES_NAMES = ["circle", "square", "triangle", "star", "cross", "ring"]


@pytest.fixture(scope="module")
def coco_mini() -> Path:
    return shared_path("data", "coco-mini")


@pytest.fixture(scope="module")
def shapes() -> Path:
    return shared_path("data", "shapes")


def _write_image(path: Path, height: int = 40, width: int = 60) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((height, width, 3), 90, dtype=np.uint8))
    return path


def _write_yaml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _tiny_yolo(root: Path, labels: dict[str, str], *, names: str = "[a, b, c]") -> Path:
    """A YOLO dataset under root: images/val/<name>.jpg (60x40) with the given label texts."""
    for name, text in labels.items():
        _write_image(root / "images" / "val" / f"{name}.jpg")
        if text is not None:
            label = root / "labels" / "val" / f"{name}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(text)
    return _write_yaml(root / "data.yaml", f"path: .\nval: images/val\nnames: {names}\n")


# --------------------------------------------------------------------------------------------------
# COCO json


def test_coco_mini_loads_with_every_image_and_category(coco_mini):
    dataset = load_dataset(coco_mini / "annotations" / "instances_val2017.json")
    assert len(dataset) == 158 == len(dataset.image_ids) == len(set(dataset.image_ids))
    assert all(p.parent == coco_mini / "val2017" and p.is_file() for p in dataset.image_paths)
    assert len(dataset.category_ids) == 80 and dataset.category_ids == sorted(dataset.category_ids)
    assert dataset.category_ids[0] == 1 and dataset.category_ids[-1] == 90
    assert dataset.coco is not None and len(dataset.coco["annotations"]) == 1424


def test_coco_mini_category_mapping_round_trips(coco_mini):
    path = coco_mini / "annotations" / "instances_val2017.json"
    dataset = load_dataset(path)
    raw = json.loads(path.read_text())
    by_id = {c["id"]: c["name"] for c in raw["categories"]}
    for index, (name, category_id) in enumerate(zip(dataset.class_names, dataset.category_ids, strict=True)):
        assert by_id[category_id] == name
        assert dataset.category_ids.index(category_id) == index == dataset.class_names.index(name)
    # Contiguous order is the order of the pretrained heads (nasquant's COCO_CLASSES).
    assert dataset.class_names == list(COCO_CLASSES)
    files = {image["id"]: image["file_name"] for image in raw["images"]}
    assert all(files[i] == p.name for i, p in zip(dataset.image_ids, dataset.image_paths, strict=True))


def test_coco_json_root_folder_and_explicit_images_agree(coco_mini):
    json_path = coco_mini / "annotations" / "instances_val2017.json"
    a = load_dataset(json_path)
    b = load_dataset(coco_mini)
    c = load_dataset(json_path, images=coco_mini / "val2017")
    for other in (b, c):
        assert other.image_paths == a.image_paths and other.image_ids == a.image_ids
        assert other.category_ids == a.category_ids and other.class_names == a.class_names


def test_coco_layout_with_images_subfolder(tmp_path, shapes):
    # <root>/annotations/instances_val.json + <root>/images/val/ (super-gradients' recipe layout)
    shutil.copytree(shapes / "val" / "images", tmp_path / "images" / "val")
    (tmp_path / "annotations").mkdir()
    shutil.copy(shapes / "val" / "annotations.json", tmp_path / "annotations" / "instances_val.json")
    dataset = load_dataset(tmp_path)
    assert len(dataset) == 300 and dataset.image_paths[0].parent == tmp_path / "images" / "val"


def test_coco_json_fills_fields_pycocotools_needs(tmp_path):
    _write_image(tmp_path / "images" / "a.jpg")
    coco = {
        "images": [{"id": 5, "file_name": "a.jpg", "height": 40, "width": 60}],
        "annotations": [{"image_id": 5, "category_id": 2, "bbox": [1, 2, 10, 20]}],
        "categories": [{"id": 2, "name": "b"}, {"id": 1, "name": "a"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    dataset = load_dataset(tmp_path / "ann.json")
    assert dataset.class_names == ["a", "b"] and dataset.category_ids == [1, 2]
    annotation = dataset.coco["annotations"][0]
    assert (annotation["area"], annotation["iscrowd"], annotation["id"]) == (200, 0, 1)


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "not a COCO detection json"),
        ('{"images": [], "annotations": []}', "no 'categories' list"),
        ("{not json", "cannot read COCO json"),
        (
            '{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [], "categories": [{"id": 1}]}',
            "categories entry #0",
        ),
        (
            '{"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "a"}], '
            '"annotations": [{"image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1]}]}',
            "category id 9",
        ),
    ],
)
def test_bad_coco_json_is_a_clear_error(tmp_path, content, message):
    _write_image(tmp_path / "images" / "a.jpg")
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(NasquantError, match=message) as info:
        load_dataset(tmp_path / "bad.json")
    assert "bad.json" in str(info.value)


def test_coco_json_with_missing_images(tmp_path, shapes):
    (tmp_path / "images").mkdir()
    shutil.copy(shapes / "val" / "annotations.json", tmp_path / "annotations.json")
    with pytest.raises(NasquantError, match="cannot find the images"):
        load_dataset(tmp_path / "annotations.json")
    shutil.copy(shapes / "val" / "images" / "shapes_val_000000.jpg", tmp_path / "images")
    with pytest.raises(NasquantError, match="299 of the 300 images"):
        load_dataset(tmp_path / "annotations.json")


# --------------------------------------------------------------------------------------------------
# Ultralytics YAML


def _ground_truth_by_file(dataset) -> dict[str, list[tuple[int, list[float]]]]:
    files = {image["id"]: Path(image["file_name"]).name for image in dataset.coco["images"]}
    boxes = defaultdict(list)
    for annotation in dataset.coco["annotations"]:
        boxes[files[annotation["image_id"]]].append((annotation["category_id"], annotation["bbox"]))
    return {name: sorted(found, key=lambda b: (b[0], *np.round(b[1], 1))) for name, found in boxes.items()}


def test_shapes_coco_and_yolo_give_identical_ground_truth(shapes):
    coco = load_dataset(shapes / "val" / "annotations.json")
    yolo = load_dataset(shapes / "val_yolo" / "shapes_val.yaml")
    assert coco.class_names == yolo.class_names == SHAPES_NAMES
    assert coco.category_ids == yolo.category_ids == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in coco.image_paths] == [p.name for p in yolo.image_paths]
    assert yolo.image_ids == list(range(1, 301))
    sizes = {Path(i["file_name"]).name: (i["height"], i["width"]) for i in coco.coco["images"]}
    assert {Path(i["file_name"]).name: (i["height"], i["width"]) for i in yolo.coco["images"]} == sizes

    coco_gt, yolo_gt = _ground_truth_by_file(coco), _ground_truth_by_file(yolo)
    assert coco_gt.keys() == yolo_gt.keys()
    assert sum(map(len, yolo_gt.values())) == len(coco.coco["annotations"]) == 1649
    for name, expected in coco_gt.items():
        got = yolo_gt[name]
        assert [c for c, _ in got] == [c for c, _ in expected], name
        np.testing.assert_allclose([b for _, b in got], [b for _, b in expected], atol=1e-3, err_msg=name)
    for annotation in yolo.coco["annotations"]:
        assert annotation["iscrowd"] == 0
        assert annotation["area"] == pytest.approx(annotation["bbox"][2] * annotation["bbox"][3])


def test_yaml_path_is_relative_to_the_yaml_not_the_cwd(shapes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dataset = load_dataset(shapes / "val_yolo" / "shapes_val.yaml")
    assert len(dataset) == 300 and dataset.image_paths[0].is_file()


def test_yolo_txt_list_names_list_polygons_and_unlabeled_images(tmp_path):
    root = tmp_path / "set"
    _write_image(root / "images" / "b.jpg", 40, 60)
    _write_image(root / "images" / "a.jpg", 40, 60)
    (root / "labels").mkdir()
    # a.jpg: one box and one polygon; b.jpg has no label file (background image).
    (root / "labels" / "a.txt").write_text("1 0.5 0.5 0.5 0.25\n\n0 0.1 0.1 0.4 0.1 0.4 0.6 0.1 0.6\n")
    (root / "val.txt").write_text("./images/b.jpg\nimages/a.jpg\n")
    yaml_path = _write_yaml(tmp_path / "cfg" / "d.yaml", f"path: {root}\nval: val.txt\nnames: [x, y]\n")
    dataset = load_dataset(yaml_path)
    assert [p.name for p in dataset.image_paths] == ["a.jpg", "b.jpg"]  # sorted file order
    assert dataset.class_names == ["x", "y"] and dataset.category_ids == [1, 2]
    boxes = [(a["image_id"], a["category_id"], a["bbox"]) for a in dataset.coco["annotations"]]
    assert boxes[0][:2] == (1, 2) and boxes[1][:2] == (1, 1)
    np.testing.assert_allclose(boxes[0][2], [15, 15, 30, 10])
    np.testing.assert_allclose(boxes[1][2], [6, 4, 18, 20])
    assert len(dataset.coco["images"]) == 2


def test_yolo_image_sizes_are_read_from_the_files(tmp_path):
    _write_image(tmp_path / "images" / "val" / "wide.jpg", 30, 70)
    yaml_path = _write_yaml(tmp_path / "d.yaml", "val: images/val\nnames: {0: a}\n")
    (image,) = load_dataset(yaml_path).coco["images"]
    assert (image["height"], image["width"]) == (30, 70)


@pytest.mark.parametrize(
    "label, message",
    [
        ("3 0.5 0.5 0.1 0.1", r"class 3 but the dataset has 3 classes"),
        ("0 0.5 0.5 0.1", r"expected 'class cx cy w h'"),
        ("0 0.5 zero 0.1 0.1", r"non-numeric"),
        ("0.5 0.5 0.5 0.1 0.1", r"class must be a non-negative integer"),
        ("0 0.5 0.5 1.5 0.1", r"normalized to \[0, 1\]"),
    ],
)
def test_bad_yolo_labels_name_file_and_line(tmp_path, label, message):
    yaml_path = _tiny_yolo(tmp_path, {"img": f"0 0.5 0.5 0.2 0.2\n{label}\n"})
    with pytest.raises(NasquantError, match=message) as info:
        load_dataset(yaml_path)
    assert f"{Path('labels') / 'val' / 'img.txt'}:2" in str(info.value)


def test_yaml_errors(tmp_path):
    yaml_path = _tiny_yolo(tmp_path, {"img": "0 0.5 0.5 0.2 0.2\n"})
    with pytest.raises(NasquantError, match="no 'test' split .*val"):
        load_dataset(yaml_path, split="test")
    missing = _write_yaml(tmp_path / "missing.yaml", "path: .\nval: nowhere\nnames: [a]\n")
    with pytest.raises(NasquantError, match="missing.yaml: split path .*nowhere does not exist"):
        load_dataset(missing)
    mismatch = _write_yaml(tmp_path / "nc.yaml", "val: images/val\nnc: 4\nnames: [a, b]\n")
    with pytest.raises(NasquantError, match="nc is 4 but 'names' has 2"):
        load_dataset(mismatch)
    not_a_mapping = _write_yaml(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(NasquantError, match="list.yaml is not an Ultralytics data yaml"):
        load_dataset(not_a_mapping)


# --------------------------------------------------------------------------------------------------
# image folders and general errors


def test_image_folder_is_an_unlabeled_dataset(shapes):
    images = shapes / "calib" / "images"
    dataset = load_dataset(images)
    assert len(dataset) == 256 and dataset.coco is None
    assert dataset.class_names == [] and dataset.category_ids == []
    assert dataset.image_paths == sorted(images.glob("*.jpg"))
    assert dataset.image_ids == list(range(1, 257))
    assert load_dataset(shapes / "calib").image_paths == dataset.image_paths  # its images/ subfolder


def test_missing_and_unsupported_paths(tmp_path):
    with pytest.raises(NasquantError, match="dataset not found: .*nothing"):
        load_dataset(tmp_path / "nothing")
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(NasquantError, match="unsupported dataset file .*data.csv"):
        load_dataset(tmp_path / "data.csv")
    with pytest.raises(NasquantError, match="no images"):
        load_dataset(tmp_path)


# --------------------------------------------------------------------------------------------------
# batching


def test_iter_batches_matches_per_image_preprocessing(shapes):
    dataset = load_dataset(shapes / "val" / "annotations.json")
    dataset.image_paths, dataset.image_ids = dataset.image_paths[:11], dataset.image_ids[:11]
    spec = Preprocess.from_protocol("sg", 320)
    batches = list(iter_batches(dataset, spec, 4, workers=3))
    assert [len(b.images) for b in batches] == [4, 4, 3]
    assert [i for b in batches for i in b.image_ids] == dataset.image_ids
    assert [p for b in batches for p in b.paths] == dataset.image_paths
    for batch in batches:
        assert batch.images.shape[1:] == (3, 320, 320) and batch.images.dtype == np.float32
        for image, transform, path in zip(batch.images, batch.transforms, batch.paths, strict=True):
            expected, expected_transform = preprocess(read_image(path), spec)
            np.testing.assert_array_equal(image, expected)
            assert transform == expected_transform


def test_iter_batches_errors(tmp_path):
    _write_image(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"broken")
    dataset = load_dataset(tmp_path)
    with pytest.raises(NasquantError, match="batch size"):
        next(iter_batches(dataset, Preprocess(64, 64), 0))
    with pytest.raises(NasquantError, match="b.jpg"):
        list(iter_batches(dataset, Preprocess(64, 64), 2))


def test_an_explicit_format_is_checked_against_what_is_on_disk():
    coco_json = shared_path("data", "shapes", "val", "annotations.json")
    assert load_dataset(coco_json, kind="coco").coco is not None
    with pytest.raises(NasquantError, match="looks like a coco dataset, not yolo"):
        load_dataset(coco_json, kind="yolo")
    with pytest.raises(NasquantError, match="unknown dataset format 'voc'"):
        load_dataset(coco_json, kind="voc")
    # Any folder of images can calibrate, annotated or not.
    unlabeled = load_dataset(shared_path("data", "shapes", "val"), kind="images")
    assert unlabeled.coco is None and len(unlabeled) == 300
