"""Stage ``load``: the fused model, its preprocessing and the validation set (never cached: cheap)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from nasquant.api import NAS
from nasquant.data.datasets import load_dataset
from nasquant.data.detection import DetectionDataset
from nasquant.data.preprocess import Preprocess
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

    nas: NAS
    spec: Preprocess
    weights_key: str
    """The weights and preprocessing: what calibration and sensitivity depend on."""
    key: str
    """The weights, preprocessing and class names: what an exported graph records."""
    validation: DetectionDataset
    val_subset: DetectionDataset
    """The images validation runs on (``validation.max_images`` of them, or all)."""


def load(ctx: RunContext) -> Loaded:
    fields = ctx.fields(*READS)
    started = time.perf_counter()
    model = fields.model
    nas = NAS(fields.resolve_path(model.checkpoint), variant=model.variant, sha256=model.sha256).fuse()
    if model.class_names:
        if len(model.class_names) != nas.model.num_classes:
            raise NasquantError(
                f"model.class_names lists {len(model.class_names)} names but the model has "
                f"{nas.model.num_classes} classes"
            )
        nas.names = list(model.class_names)
    spec = nas.preprocessing(fields.validation.protocol, fields.input.size)
    weights_key = stage_key(nas.checkpoint.sha256, spec)
    summary = f"{nas.variant}, {nas.model.num_classes} classes, input {spec.imgsz}, fused"
    ctx.finished("load", summary, started)
    validation = load_dataset(fields.resolve_path(fields.validation.data), kind=fields.validation.format)
    return Loaded(
        nas=nas,
        spec=spec,
        weights_key=weights_key,
        key=stage_key(weights_key, nas.names, fields.validation.protocol),
        validation=validation,
        val_subset=validation.first(fields.validation.max_images),
    )
