"""COCO box metrics computed by pycocotools itself, from in-memory ground truth and detections."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from nasquant.data.preprocess import ImageTransform
from nasquant.eval.postprocess import Detections

#: Names for ``COCOeval.stats``, in its order.
STAT_NAMES = (
    "map50_95",
    "map50",
    "map75",
    "map_small",
    "map_medium",
    "map_large",
    "ar1",
    "ar10",
    "ar100",
    "ar_small",
    "ar_medium",
    "ar_large",
)


def coco_detections(
    detections: Sequence[Detections],
    transforms: Sequence[ImageTransform],
    image_ids: Sequence[int],
    category_ids: Sequence[int],
) -> list[dict]:
    """COCO results rows (``image_id, category_id, bbox [x, y, w, h], score``) in original pixels.

    ``category_ids[i]`` is the COCO category id of contiguous class ``i``.
    """
    lookup = np.asarray(category_ids, dtype=np.int64)
    rows = []
    for dets, transform, image_id in zip(detections, transforms, image_ids, strict=True):
        boxes = transform.to_original(dets.boxes.astype(np.float64))
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        categories = lookup[dets.class_ids]
        for box, score, category in zip(
            xywh.tolist(), dets.scores.tolist(), categories.tolist(), strict=True
        ):
            rows.append({"image_id": int(image_id), "category_id": category, "bbox": box, "score": score})
    return rows


def evaluate_coco(gt: dict, results: list[dict], class_names: Sequence[str] | None = None) -> dict:
    """pycocotools' bbox ``COCOeval`` of ``results`` against ``gt``, as a flat dict of fractions.

    Keys: the 12 ``stats`` (:data:`STAT_NAMES`; ``None`` where pycocotools reports -1 because no
    ground truth falls in that area range), ``per_class`` (name -> AP@[.5:.95], ``None`` for a
    class without ground truth), ``classes`` (name -> ``images``, ``instances``, ``precision``,
    ``recall``, ``ap50``, ``ap50_95``: :func:`_class_table`), ``num_images`` and ``num_detections``. ``class_names`` are listed
    in ascending category id (the dataset's contiguous order); by default the json's own names.
    """
    categories = sorted(gt["categories"], key=lambda c: int(c["id"]))
    names = list(class_names) if class_names is not None else [str(c["name"]) for c in categories]
    if len(names) != len(categories):
        raise ValueError(f"{len(names)} class names for {len(categories)} ground-truth categories")
    # COCOeval writes an "ignore" flag into ground-truth annotations and loadRes fills in fields of
    # the result rows: work on copies so the caller's data stays as it was.
    gt = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
    results = [dict(r) for r in results]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the table
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results) if results else _empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics: dict = {name: _fraction(value) for name, value in zip(STAT_NAMES, evaluator.stats, strict=True)}
    metrics["classes"] = _class_table(evaluator, gt, categories, names)
    metrics["per_class"] = {name: row["ap50_95"] for name, row in metrics["classes"].items()}
    metrics["num_images"] = len(evaluator.params.imgIds)
    metrics["num_detections"] = len(results)
    return metrics


def _empty_results(coco_gt: COCO) -> COCO:
    # loadRes cannot take an empty list (it inspects the first row); an empty result set is still
    # a valid evaluation (0 AP wherever there is ground truth), so build it directly.
    empty = COCO()
    empty.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": coco_gt.dataset["categories"],
        "annotations": [],
    }
    empty.createIndex()
    return empty


def _fraction(value: float) -> float | None:
    return None if value < 0 else float(value)


def _class_table(
    evaluator: COCOeval, gt: dict, categories: Sequence[dict], names: Sequence[str]
) -> dict[str, dict]:
    """Per class: images and (non-crowd) instances in the ground truth, AP50, AP50-95 (averaged over
    the accumulated precision table, as Detectron reports per-class AP), and precision /
    recall at the class's best-F1 point of its IoU-0.5 precision-recall curve (COCOeval's 101 recall
    points, all areas, 100 detections). Ultralytics reports P/R at one confidence shared by all
    classes, so its numbers differ a little; the APs are pycocotools' own. ``None`` without ground truth.
    """
    precision = evaluator.eval["precision"]
    area_all = evaluator.params.areaRngLbl.index("all")
    max_dets_100 = evaluator.params.maxDets.index(100)
    iou_50 = int(np.argmin(np.abs(evaluator.params.iouThrs - 0.5)))
    recall_points = np.asarray(evaluator.params.recThrs)
    images: dict[int, set[int]] = {}
    instances: dict[int, int] = {}
    for annotation in gt["annotations"]:
        if annotation.get("iscrowd", 0):
            continue
        category = int(annotation["category_id"])
        images.setdefault(category, set()).add(int(annotation["image_id"]))
        instances[category] = instances.get(category, 0) + 1
    table: dict[str, dict] = {}
    for k, (category, name) in enumerate(zip(categories, names, strict=True)):
        curve = precision[iou_50, :, k, area_all, max_dets_100]
        if curve.max(initial=-1) < 0:  # no ground truth: COCOeval leaves -1
            table[name] = {"images": 0, "instances": 0, "precision": None, "recall": None, "ap50": None,
                           "ap50_95": None}  # fmt: skip
            continue
        f1 = 2 * curve * recall_points / np.maximum(curve + recall_points, 1e-12)
        best = int(np.argmax(f1))
        all_ious = precision[:, :, k, area_all, max_dets_100]
        table[name] = {
            "images": len(images.get(int(category["id"]), ())),
            "instances": instances.get(int(category["id"]), 0),
            "precision": float(curve[best]) if f1[best] > 0 else 0.0,
            "recall": float(recall_points[best]) if f1[best] > 0 else 0.0,
            "ap50": float(curve[curve > -1].mean()),
            "ap50_95": float(all_ious[all_ious > -1].mean()),
        }
    return table
