"""The ``finetune`` stage inside ``nasquant export``: off by default, a cached stage when on, and what
it changes in the exported graphs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from nasquant.artifacts import finetuned_name
from nasquant.errors import NasquantError
from nasquant.pipeline import run_export
from nasquant.recipe import FinetuneSection, Recipe
from tests.pipeline.recipes import recipe_from_calibration_images


def _recipe(**finetune) -> Recipe:
    recipe = recipe_from_calibration_images(nms=None, num_images=8)
    return replace(
        recipe,
        quantization=replace(recipe.quantization, bias_correction=False),
        finetune=replace(recipe.finetune, **finetune),
    )


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_finetune_is_off_by_default() -> None:
    assert not FinetuneSection().enabled and not _recipe().finetune.enabled


def test_finetune_runs_as_a_cached_stage_between_selection_and_export(tmp_path: Path) -> None:
    runs: dict[str, list[str]] = {}

    def export(name: str, recipe: Recipe) -> Path:
        runs[name] = []
        result = run_export(recipe, "onnx-int8", output=tmp_path, progress=False, log=runs[name].append)
        return next(p for p in result.files if p.name.endswith(".trt.onnx"))

    plain = _initializers(export("off", _recipe()))
    assert not any(line.startswith("[finetune]") for line in runs["off"])
    tuned_recipe = _recipe(enabled=True, steps=2, batch_size=4, learn_ranges=True)
    tuned = _initializers(export("on", tuned_recipe))
    assert (tmp_path / finetuned_name("model.int8")).is_file()
    # the quantize-everything baseline is not part of an export: only the shipped model is tuned
    assert not (tmp_path / finetuned_name("model.int8-all")).exists()
    finetune_lines = [line for line in runs["on"] if line.startswith("[finetune]")]
    assert any("2 steps on 8 images (cpu)" in line for line in finetune_lines)
    assert any("distillation loss" in line and "(reused)" not in line for line in finetune_lines)
    # the export reran on the tuned weights and the learned ranges: activation scales moved too
    changed = {name for name in plain if name in tuned and not np.array_equal(plain[name], tuned[name])}
    activation_scales = {
        name for name, value in plain.items() if value.ndim == 0 and value.dtype == np.float32
    }
    assert changed & activation_scales and changed - activation_scales
    # the same recipe again: the tuned weights are reloaded, the graphs identical
    again = _initializers(export("again", tuned_recipe))
    assert any("distillation loss" in line and "(reused)" in line for line in runs["again"])
    assert all(np.array_equal(again[name], tuned[name]) for name in tuned)
    # a damaged file is one clear line, never a traceback or a silent retrain
    (tmp_path / finetuned_name("model.int8")).write_bytes(b"not safetensors")
    with pytest.raises(NasquantError, match="cannot read fine-tuned weights .* delete it to fine-tune again"):
        export("damaged", tuned_recipe)
