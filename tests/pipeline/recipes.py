"""The recipe ``nasquant export --calib`` builds for the shapes fixture, shrunk for tests."""

from __future__ import annotations

from dataclasses import replace

from nasquant.pipeline.export_job import export_recipe
from nasquant.recipe import Recipe
from nasquant.settings import PREDICT_NMS, NMSSettings
from tests.shared import shared_path


def recipe_from_calibration_images(*, nms: NMSSettings | None = PREDICT_NMS, num_images: int = 16) -> Recipe:
    """The fixture's ``.pt`` with the shapes calibration folder, ``num_images`` of its images."""
    recipe = export_recipe(
        None,
        checkpoint=str(shared_path("fixtures", "yolo_nas_s_shapes.pt")),
        calib=shared_path("data", "shapes", "calib"),
        imgsz=None,
        dynamic_batch=False,
        nms=nms,
    )
    return replace(recipe, calibration=replace(recipe.calibration, num_images=num_images))
