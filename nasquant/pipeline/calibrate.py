"""Stages ``calibrate``: choose the calibration images (guarded against validation overlap), then
calibrate every quantizer with ModelOpt, cached as ``calibration.safetensors``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nasquant.artifacts import CALIBRATION_LIST_NAME, CALIBRATION_NAME
from nasquant.data.calibration import check_no_overlap, select_calibration_images, write_image_list
from nasquant.data.datasets import iter_batches, load_dataset
from nasquant.data.detection import DetectionDataset
from nasquant.errors import NasquantError
from nasquant.pipeline.context import RunContext, cached_stage, stage_key
from nasquant.pipeline.load import Loaded
from nasquant.quant import calibrate as modelopt_calibrate
from nasquant.quant import load_calibration, save_calibration
from nasquant.recipe import Recipe

#: What chooses the images. The images themselves, not these, go into the calibration's key: a rerun
#: of recipe.resolved.yaml (whose list pins the draw) reuses the ranges.
SELECTION_READS = (
    "calibration.data",
    "calibration.format",
    "calibration.image_list",
    "calibration.num_images",
    "calibration.seed",
    "calibration.allow_overlap",
)
#: What shapes the ranges.
READS = (
    "calibration.method",
    "calibration.percentile",
    "calibration.batch_size",
    "quantization.per_channel_weights",
)


@dataclass(frozen=True)
class CalibrationImages:
    dataset: DetectionDataset
    recipe: Recipe
    """The run's recipe from here on: the given one, or (after a seeded draw) one that names the drawn
    list, so its resolved copy reproduces the run even if the folder gains or loses images."""


@dataclass(frozen=True)
class Calibrated:
    model: torch.nn.Module
    """The fused network with every quantizer calibrated (all layers INT8)."""
    key: str
    images: DetectionDataset
    """The calibration images (bias correction measures on them too)."""


def calibration_images(ctx: RunContext, validation: DetectionDataset | None) -> CalibrationImages:
    """The calibration images, none showing a validation image (when there is a validation set), their
    names written to the run folder: the recipe's ``image_list``, or (without one) the seeded draw."""
    section = ctx.fields(*SELECTION_READS).calibration
    data = ctx.recipe.resolve_path(section.data)
    image_list = Path(ctx.recipe.resolve_path(section.image_list)) if section.image_list else None
    if image_list is not None and not image_list.is_file():
        raise NasquantError(
            f"{ctx.recipe.label}: calibration.image_list {image_list} does not exist; for COCO make it with "
            f"`python calibration/make_coco_list.py <COCO>/annotations/instances_train2017.json --count "
            f"{section.num_images} --out {image_list}` (nasquant repository), or drop "
            f"calibration.image_list to draw {section.num_images} images of {data} by seed"
        )
    source = load_dataset(data, kind=section.format)
    chosen = select_calibration_images(
        source, num_images=section.num_images, seed=section.seed, image_list=image_list
    )
    if validation is not None:
        check_no_overlap(chosen.image_paths, validation.image_paths, allow=section.allow_overlap)
    # Absolute: the resolved recipe resolves relative paths against its own folder, not the cwd.
    written = (ctx.run_dir / CALIBRATION_LIST_NAME).resolve()
    if image_list is not None:
        if image_list.resolve() != written:
            write_image_list(written, chosen, header=f"The first {len(chosen)} images of {image_list}")
        return CalibrationImages(chosen, ctx.recipe)
    write_image_list(
        written,
        chosen,
        header=f"{len(chosen)} of the {len(source)} images in {source.name}, drawn with seed {section.seed}\n"
        "(nasquant.data.calibration.select_calibration_images: sorted names, seeded permutation)",
    )
    ctx.log(
        f"[calibrate] drew {len(chosen)} of {len(source)} images (seed {section.seed}, no calibration."
        f"image_list); to calibrate on these again: --set calibration.image_list={written}"
    )
    pinned = replace(ctx.recipe.calibration, image_list=str(written))
    return CalibrationImages(chosen, replace(ctx.recipe, calibration=pinned))


def calibrate(ctx: RunContext, loaded: Loaded, images: DetectionDataset) -> Calibrated:
    fields = ctx.fields(*READS)
    section = fields.calibration
    path = ctx.run_dir / CALIBRATION_NAME
    paths = [str(p) for p in images.image_paths]
    key = stage_key(loaded.weights_key, fields.values, paths)
    calibrated: list[torch.nn.Module] = []

    def compute() -> dict:
        per_channel = fields.quantization.per_channel_weights
        batches = (b.images for b in iter_batches(images, loaded.spec, section.batch_size))
        model = modelopt_calibrate(
            loaded.detector.model,
            batches,
            method=section.method,
            percentile=section.percentile,
            per_channel_weights=per_channel,
            progress=ctx.progress,
            total=-(-len(images) // section.batch_size),
        )
        save_calibration(
            model,
            path,
            settings={
                "method": section.method,
                "percentile": section.percentile,
                "per_channel_weights": per_channel,
                "num_images": len(images),
            },
        )
        calibrated.append(model)
        return {"images": paths}

    record = cached_stage(
        ctx,
        "calibrate",
        key,
        compute,
        summary=lambda _: f"{len(images)} images, {section.method}",
        outputs=[path],
    )
    model = calibrated[0] if calibrated else load_calibration(loaded.detector.model, path)
    return Calibrated(model, record.key, images)
