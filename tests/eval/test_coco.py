from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from nasquant.data.datasets import load_dataset
from nasquant.data.preprocess import Preprocess, preprocess
from nasquant.eval.coco import STAT_NAMES, coco_detections, evaluate_coco
from nasquant.eval.postprocess import Detections
from tests.shared import shared_path


@pytest.fixture(scope="module")
def coco_json() -> Path:
    return shared_path("data", "coco-mini", "annotations", "instances_val2017.json")


def _handmade_results(gt: dict, seed: int = 0) -> list[dict]:
    """Jittered copies of most ground-truth boxes, duplicates, class confusions and false positives."""
    rng = np.random.default_rng(seed)
    category_ids = [c["id"] for c in gt["categories"]]
    sizes = {i["id"]: (i["width"], i["height"]) for i in gt["images"]}
    rows = []
    for annotation in gt["annotations"]:
        if rng.random() < 0.2:
            continue  # missed
        x, y, w, h = annotation["bbox"]
        jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
        box = [x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0), max(h + jitter[3], 1.0)]
        category = annotation["category_id"]
        if rng.random() < 0.1:
            category = int(rng.choice(category_ids))  # confused class
        rows.append(
            {"image_id": annotation["image_id"], "category_id": category, "bbox": box, "score": rng.random()}
        )
        if rng.random() < 0.15:  # a duplicate at lower score
            rows.append({**rows[-1], "score": rows[-1]["score"] * 0.5})
    for image_id, (width, height) in sizes.items():
        for _ in range(rng.integers(0, 4)):  # background false positives
            w, h = rng.uniform(5, width / 3), rng.uniform(5, height / 3)
            box = [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h]
            rows.append(
                {
                    "image_id": image_id,
                    "category_id": int(rng.choice(category_ids)),
                    "bbox": box,
                    "score": rng.random() * 0.6,
                }
            )
    return rows


def _pycocotools_reference(json_path: Path, rows: list[dict]) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(json_path))
        evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(rows)), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _assert_stats_equal(metrics: dict, stats: np.ndarray) -> None:
    for name, value in zip(STAT_NAMES, stats, strict=True):
        if value < 0:
            assert metrics[name] is None, name
        else:
            assert metrics[name] == pytest.approx(value, abs=1e-6), name


def test_matches_pycocotools_run_on_the_json_file(coco_json):
    dataset = load_dataset(coco_json)
    rows = _handmade_results(dataset.coco)
    rows_before = copy.deepcopy(rows)
    metrics = evaluate_coco(dataset.coco, rows, dataset.class_names)
    reference = _pycocotools_reference(coco_json, rows)

    _assert_stats_equal(metrics, reference.stats)
    assert 0.2 < metrics["map50_95"] < 0.9  # the hand-made results are neither perfect nor useless
    assert metrics["num_images"] == 158 and metrics["num_detections"] == len(rows)
    assert rows == rows_before  # pycocotools' loadRes adds fields: not to the caller's rows
    assert all("ignore" not in a for a in dataset.coco["annotations"])

    # per class: Detectron's formula on the reference's own precision table
    precision = reference.eval["precision"][:, :, :, 0, 2]
    assert len(metrics["per_class"]) == 80 and list(metrics["per_class"]) == dataset.class_names
    for k, name in enumerate(dataset.class_names):
        values = precision[:, :, k]
        values = values[values > -1]
        expected = float(values.mean()) if values.size else None
        assert metrics["per_class"][name] == pytest.approx(expected, abs=1e-9), name
    present = [v for v in metrics["per_class"].values() if v is not None]
    assert np.mean(present) == pytest.approx(metrics["map50_95"], abs=1e-9)


def test_class_without_ground_truth_has_no_ap():
    dataset = load_dataset(shared_path("data", "shapes", "val", "annotations.json"))
    gt = {**dataset.coco, "annotations": [a for a in dataset.coco["annotations"] if a["category_id"] != 6]}
    rows = _handmade_results(dataset.coco, seed=3)
    assert any(r["category_id"] == 6 for r in rows)  # detections of the class, but no ground truth
    per_class = evaluate_coco(gt, rows, dataset.class_names)["per_class"]
    assert per_class["ring"] is None
    assert all(isinstance(per_class[name], float) for name in dataset.class_names[:5])


def test_detections_map_back_to_ground_truth_through_preprocessing(coco_json):
    """GT boxes pushed through to_input as network-space detections come back as the GT: AP 1."""
    dataset = load_dataset(coco_json)
    gt = dataset.coco
    index_of = {cid: i for i, cid in enumerate(dataset.category_ids)}
    by_image: dict[int, list[dict]] = {i: [] for i in dataset.image_ids}
    for annotation in gt["annotations"]:
        if not annotation["iscrowd"]:
            by_image[annotation["image_id"]].append(annotation)
    sizes = {i["id"]: (i["height"], i["width"]) for i in gt["images"]}
    spec = Preprocess.from_protocol("sg", 640)
    detections, transforms = [], []
    for image_id in dataset.image_ids:
        height, width = sizes[image_id]
        _, transform = preprocess(np.zeros((height, width, 3), dtype=np.uint8), spec)
        annotations = by_image[image_id]
        xywh = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        detections.append(
            Detections(
                boxes=transform.to_input(xyxy).astype(np.float32),
                scores=np.linspace(0.9, 0.5, len(annotations), dtype=np.float32),
                class_ids=np.array([index_of[a["category_id"]] for a in annotations], dtype=np.int64),
            )
        )
        transforms.append(transform)
    rows = coco_detections(detections, transforms, dataset.image_ids, dataset.category_ids)

    expected = [(a["image_id"], a["category_id"]) for i in dataset.image_ids for a in by_image[i]]
    assert [(r["image_id"], r["category_id"]) for r in rows] == expected
    truth = [a["bbox"] for i in dataset.image_ids for a in by_image[i]]
    np.testing.assert_allclose([r["bbox"] for r in rows], truth, atol=1e-3)
    assert all(isinstance(r["score"], float) and isinstance(r["category_id"], int) for r in rows)
    json.dumps(rows)  # plain Python types, ready to save

    metrics = evaluate_coco(gt, rows, dataset.class_names)
    assert metrics["map50_95"] == pytest.approx(1.0) and metrics["map50"] == pytest.approx(1.0)


def test_empty_results_are_zero_not_a_crash(coco_json):
    dataset = load_dataset(coco_json)
    metrics = evaluate_coco(dataset.coco, [], dataset.class_names)
    assert metrics["map50_95"] == metrics["map50"] == metrics["ar100"] == 0.0
    assert metrics["num_detections"] == 0 and metrics["num_images"] == 158
    assert metrics["per_class"]["person"] == 0.0


def test_class_names_default_to_the_json(coco_json):
    dataset = load_dataset(coco_json)
    rows = _handmade_results(dataset.coco, seed=1)
    assert evaluate_coco(dataset.coco, rows) == evaluate_coco(dataset.coco, rows, dataset.class_names)
    with pytest.raises(ValueError, match="class names"):
        evaluate_coco(dataset.coco, rows, ["person"])


def test_shapes_coco_and_yolo_ground_truth_score_the_same():
    coco = load_dataset(shared_path("data", "shapes", "val", "annotations.json"))
    yolo = load_dataset(shared_path("data", "shapes", "val_yolo", "shapes_val.yaml"))
    rows = _handmade_results(coco.coco, seed=2)
    # Same images in the same order with the same ids (1..300), so the rows apply to both.
    assert coco.image_ids == yolo.image_ids
    a = evaluate_coco(coco.coco, rows, coco.class_names)
    b = evaluate_coco(yolo.coco, rows, yolo.class_names)
    # Only the all-area stats: YOLO's 6-decimal normalization moves boxes by < 1e-3 px, which
    # can move a box across the 32^2 / 96^2 area limits and so between small/medium/large.
    for name in ("map50_95", "map50", "map75", "ar1", "ar10", "ar100"):
        assert a[name] == pytest.approx(b[name], abs=1e-6), name
    assert a["per_class"].keys() == b["per_class"].keys()
