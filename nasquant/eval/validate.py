"""COCO validation written once for every backend: preprocess → run → post-process → pycocotools."""

from __future__ import annotations

import time
from dataclasses import asdict

from nasquant.data.datasets import iter_batches
from nasquant.data.detection import DetectionDataset
from nasquant.data.preprocess import Preprocess
from nasquant.errors import NasquantError
from nasquant.eval.coco import coco_detections, evaluate_coco
from nasquant.eval.postprocess import postprocess
from nasquant.runtime.base import Backend
from nasquant.settings import VAL_NMS, NMSSettings


def validate(
    backend: Backend,
    dataset: DetectionDataset,
    preprocess: Preprocess,
    *,
    nms: NMSSettings | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Return pycocotools' metrics (fractions) for ``backend`` on ``dataset``, plus the settings used."""
    if dataset.coco is None:
        raise NasquantError(
            f"{dataset.name} has no annotations: validation needs a COCO json or an Ultralytics data yaml"
        )
    if batch_size < 1:
        raise NasquantError(f"batch size must be at least 1, got {batch_size}")
    nms = nms or VAL_NMS
    results: list[dict] = []
    started = time.perf_counter()
    for batch in iter_batches(
        dataset, preprocess, batch_size, progress=f"val {backend.name}" if progress else None
    ):
        boxes, scores = backend.run(batch.images)
        if scores.shape[-1] != len(dataset.category_ids):
            raise NasquantError(
                f"the model predicts {scores.shape[-1]} classes but {dataset.name} has "
                f"{len(dataset.category_ids)}: wrong dataset or checkpoint?"
            )
        detections = postprocess(boxes, scores, nms)
        results.extend(coco_detections(detections, batch.transforms, batch.image_ids, dataset.category_ids))
    elapsed = time.perf_counter() - started
    metrics = evaluate_coco(dataset.coco, results, dataset.class_names)
    metrics.update(
        backend=backend.name,
        precision=backend.precision,
        device=backend.device,
        dataset=dataset.name,
        preprocess=asdict(preprocess),
        nms=asdict(nms),
        seconds=round(elapsed, 3),
    )
    return metrics
