"""COCO validation written once for every backend: preprocess → run → post-process → pycocotools."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import numpy as np

from nasquant.artifacts import KEY_NAMES
from nasquant.data.datasets import iter_batches
from nasquant.data.detection import DetectionDataset
from nasquant.data.preprocess import Preprocess
from nasquant.errors import NasquantError
from nasquant.eval.coco import coco_detections, evaluate_coco
from nasquant.eval.postprocess import from_outputs, resolve_nms
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
    """Return pycocotools' metrics (fractions) for ``backend`` on ``dataset``, plus the settings used.

    ``nms`` None: the validation defaults, or an end-to-end graph's built-in settings."""
    if dataset.coco is None:
        raise NasquantError(
            f"{dataset.name} has no annotations: validation needs a COCO json or an Ultralytics data yaml"
        )
    if batch_size < 1:
        raise NasquantError(f"batch size must be at least 1, got {batch_size}")
    built_in = resolve_nms(backend, VAL_NMS) if backend.end_to_end else None
    if built_in is not None and nms not in (None, built_in):
        raise NasquantError(f"{backend.path} has NMS built in ({built_in}); it cannot validate with {nms}")
    nms = built_in or nms or VAL_NMS
    results: list[dict] = []
    started = time.perf_counter()
    for batch in iter_batches(
        dataset, preprocess, batch_size, progress=f"val {backend.name}" if progress else None
    ):
        outputs = backend.run(batch.images)
        predicted = _class_count(backend, outputs)
        if predicted is not None and predicted != len(dataset.category_ids):
            raise NasquantError(
                f"the model predicts {predicted} classes but {dataset.name} has "
                f"{len(dataset.category_ids)}: wrong dataset or checkpoint?"
            )
        detections = from_outputs(outputs, nms, end_to_end=backend.end_to_end)
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


def _class_count(backend: Backend, outputs: tuple[np.ndarray, ...]) -> int | None:
    """How many classes the model predicts: a raw graph's score columns, an end-to-end graph's
    recorded names (None when it records none)."""
    if not backend.end_to_end:
        return outputs[1].shape[-1]
    names = backend.metadata.get(KEY_NAMES)
    return len(json.loads(names)) if names else None
