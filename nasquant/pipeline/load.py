"""Stage ``load``: the fused model, its preprocessing and the validation set (never cached: cheap)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from nasquant.data.datasets import load_dataset
from nasquant.data.detection import DetectionDataset
from nasquant.data.preprocess import Preprocess
from nasquant.detector import Detector
from nasquant.errors import NasquantError
from nasquant.pipeline.context import RunContext, stage_key

READS = (
    "model",
    "input.size",
    "validation.protocol",
    "validation.data",
    "validation.format",
    "validation.max_images",
)


@dataclass(frozen=True)
class Loaded:
    """The model every later stage works from, and the images every artifact is validated on."""

    detector: Detector
    spec: Preprocess
    weights_key: str
    """The weights and preprocessing: what calibration and sensitivity depend on."""
    key: str
    """The weights, preprocessing and class names: what an exported graph records."""
    validation: DetectionDataset | None
    """None only for a job that validates nothing (``nasquant export`` without validation data)."""
    val_subset: DetectionDataset | None
    """The images validation runs on (``validation.max_images`` of them, or all)."""


def load(ctx: RunContext) -> Loaded:
    fields = ctx.fields(*READS)
    started = time.perf_counter()
    model = fields.model
    detector = Detector(
        fields.resolve_path(model.checkpoint), variant=model.variant, sha256=model.sha256
    ).fuse()
    if model.class_names:
        if len(model.class_names) != detector.model.num_classes:
            raise NasquantError(
                f"model.class_names lists {len(model.class_names)} names but the model has "
                f"{detector.model.num_classes} classes"
            )
        detector.names = list(model.class_names)
    spec = detector.preprocessing(fields.validation.protocol, fields.input.size)
    weights_key = stage_key(detector.checkpoint.sha256, spec)
    summary = f"{detector.variant}, {detector.model.num_classes} classes, input {spec.imgsz}, fused"
    ctx.finished("load", summary, started)
    data = fields.validation.data
    validation = load_dataset(fields.resolve_path(data), kind=fields.validation.format) if data else None
    return Loaded(
        detector=detector,
        spec=spec,
        weights_key=weights_key,
        key=stage_key(weights_key, detector.names, fields.validation.protocol),
        validation=validation,
        val_subset=validation.first(fields.validation.max_images) if validation is not None else None,
    )
