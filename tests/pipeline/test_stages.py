"""Stages on their own, on the shapes fixture: each takes typed results and returns one, and the
ones that change the run's recipe return a new recipe instead of changing the one they were given."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from nasquant.artifacts import CALIBRATION_NAME
from nasquant.errors import NasquantError
from nasquant.pipeline.calibrate import calibrate, calibration_images
from nasquant.pipeline.context import RunContext, StageCache
from nasquant.pipeline.load import Loaded, load
from nasquant.pipeline.select import select
from nasquant.recipe import load_recipe
from tests.shared import shared_path

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "shapes_s_int8.yaml"


def _context(folder: Path, **changes: object) -> RunContext:
    shared_path("fixtures", "yolo_nas_s_shapes.pt")  # skip with the reason when ../shared is absent
    recipe = load_recipe(RECIPE, [f"{key}={value}" for key, value in changes.items()])
    folder.mkdir(parents=True, exist_ok=True)
    return RunContext(recipe, folder, StageCache(folder, resume=True), log=lambda _: None, progress=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="module")
def loaded(folder: Path) -> Loaded:
    return load(_context(folder, **{"validation.max_images": 8}))


def test_load_gives_the_fused_model_its_preprocessing_and_the_validation_subset(
    loaded: Loaded, tmp_path: Path
) -> None:
    assert loaded.detector.model.is_fused and loaded.spec.imgsz == 320
    assert len(loaded.val_subset) == 8 and len(loaded.validation) == 300
    renamed = load(_context(tmp_path, **{"model.class_names": "[a,b,c,d,e,f]"}))
    assert renamed.detector.names == list("abcdef")
    assert renamed.weights_key == loaded.weights_key, "names do not change what calibration depends on"
    assert renamed.key != loaded.key, "they do change what an exported graph records"


def test_load_refuses_class_names_of_another_length(tmp_path: Path) -> None:
    with pytest.raises(NasquantError, match="lists 2 names but the model has 6 classes"):
        load(_context(tmp_path, **{"model.class_names": "[a,b]"}))


def test_a_seeded_draw_returns_a_new_recipe_that_pins_it(loaded: Loaded, tmp_path: Path) -> None:
    ctx = _context(tmp_path, **{"calibration.num_images": 8})
    images = calibration_images(ctx, loaded.validation)
    assert len(images.dataset) == 8
    assert ctx.recipe.calibration.image_list is None, "the given recipe is left as it was"
    pinned = Path(images.recipe.calibration.image_list)
    assert pinned == (tmp_path / "calibration_images.txt").resolve() and pinned.is_file()
    again = calibration_images(replace(ctx, recipe=images.recipe), loaded.validation)
    assert again.recipe is images.recipe and again.dataset.image_paths == images.dataset.image_paths


def test_calibrate_once_then_reuse_the_saved_ranges(loaded: Loaded, tmp_path: Path) -> None:
    ctx = _context(tmp_path, **{"calibration.num_images": 8})
    images = calibration_images(ctx, loaded.validation).dataset
    first = calibrate(ctx, loaded, images)
    assert (tmp_path / CALIBRATION_NAME).is_file() and len(first.images) == 8
    second = calibrate(ctx, loaded, images)
    assert second.key == first.key and ctx.cache.entries["calibrate"]["key"] == first.key
    batch = torch.from_numpy(np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32))
    with torch.no_grad():
        for got, want in zip(second.model(batch), first.model(batch), strict=True):
            torch.testing.assert_close(got, want)
    percentile = calibrate(
        replace(
            ctx, recipe=replace(ctx.recipe, calibration=replace(ctx.recipe.calibration, method="percentile"))
        ),
        loaded,
        images,
    )
    assert percentile.key != first.key

    selection = select(ctx, loaded, first)
    assert selection.recipe is ctx.recipe, "a skip list leaves the recipe as it is"
    assert len(selection.skipped) == 6 and selection.fp_reason == "from the recipe's quantization.skip"
