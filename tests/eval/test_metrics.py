"""The Ultralytics-shaped metrics object over pycocotools' evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from nasquant.eval.coco import evaluate_coco
from nasquant.eval.metrics import DetectionMetrics


def _ground_truth() -> dict:
    """Two images; class 1 has three boxes, class 2 one, class 3 none."""
    boxes = [
        (1, 1, [10, 10, 40, 40]),
        (1, 1, [60, 60, 30, 30]),
        (2, 1, [5, 5, 50, 50]),
        (2, 2, [70, 10, 20, 20]),
    ]
    return {
        "images": [{"id": i, "width": 100, "height": 100} for i in (1, 2)],
        "categories": [{"id": c, "name": n} for c, n in ((1, "cat"), (2, "dog"), (3, "cow"))],
        "annotations": [
            {
                "id": k,
                "image_id": image,
                "category_id": cls,
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": 0,
            }
            for k, (image, cls, box) in enumerate(boxes, start=1)
        ],
    }


def test_a_perfect_prediction_is_one_everywhere_and_classes_without_truth_are_left_out() -> None:
    gt = _ground_truth()
    rows = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in gt["annotations"]
    ]
    metrics = DetectionMetrics(evaluate_coco(gt, rows))
    assert metrics.box.map == metrics.box.map50 == pytest.approx(1.0)
    assert (metrics.box.mp, metrics.box.mr) == pytest.approx((1.0, 1.0))
    assert metrics.box.ap_class_index.tolist() == [0, 1]  # cow has no ground truth
    assert metrics.box.maps.tolist() == pytest.approx([1.0, 1.0, metrics.box.map])  # Ultralytics' filler
    assert metrics.results_dict["classes"]["cat"] | {"precision": 0, "recall": 0} == {
        "images": 2, "instances": 3, "precision": 0, "recall": 0, "ap50": 1.0, "ap50_95": 1.0,
    }  # fmt: skip
    table = metrics.table().splitlines()
    assert [line.split()[:3] for line in table[1:]] == [
        ["all", "2", "4"],
        ["cat", "2", "3"],
        ["dog", "1", "1"],
    ]


def test_precision_and_recall_sit_at_the_best_f1_point() -> None:
    gt = _ground_truth()
    cats = [a for a in gt["annotations"] if a["category_id"] == 1]
    rows = [  # two of three cats found, plus a confident false positive
        {"image_id": 1, "category_id": 1, "bbox": [80, 0, 10, 10], "score": 0.95},
        *({"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9} for a in cats[:2]),
    ]
    metrics = DetectionMetrics(evaluate_coco(gt, rows))
    cat = metrics.results_dict["classes"]["cat"]
    assert cat["recall"] == pytest.approx(2 / 3, abs=0.01) and cat["precision"] == pytest.approx(2 / 3)
    dog = metrics.results_dict["classes"]["dog"]
    assert dog["precision"] == dog["recall"] == dog["ap50"] == 0.0  # no dog predicted
    assert metrics.box.p.tolist() == pytest.approx([cat["precision"], 0.0, 0.0])
    assert metrics.fitness == pytest.approx(0.1 * metrics.box.map50 + 0.9 * metrics.box.map)
    assert metrics["map50_95"] == metrics.box.map and np.isfinite(metrics.box.mean_results()).all()
