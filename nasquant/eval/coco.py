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
    class without ground truth), ``num_images`` and ``num_detections``. ``class_names`` are listed
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
    metrics["per_class"] = _per_class_ap(evaluator, names)
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


def _per_class_ap(evaluator: COCOeval, names: Sequence[str]) -> dict[str, float | None]:
    """AP@[.5:.95] per class from the accumulated precision table, as Detectron reports it."""
    # precision: [IoU thresholds, recall points, categories (params.catIds order), area ranges, maxDets]
    precision = evaluator.eval["precision"]
    area_all = evaluator.params.areaRngLbl.index("all")
    max_dets_100 = evaluator.params.maxDets.index(100)
    per_class: dict[str, float | None] = {}
    for k, name in enumerate(names):
        values = precision[:, :, k, area_all, max_dets_100]
        values = values[values > -1]
        per_class[name] = float(values.mean()) if values.size else None
    return per_class
