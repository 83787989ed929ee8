"""``nasquant export`` for INT8 formats: the quantize pipeline's stages, then the asked format."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from nasquant.artifacts import (
    CALIBRATION_NAME,
    DEPLOY_MD,
    END_TO_END_OUTPUT_NAMES,
    KEY_PRECISION,
    read_metadata,
)
from nasquant.cuda import tensorrt_unavailable
from nasquant.errors import NasquantError
from nasquant.pipeline import run_export
from nasquant.pipeline.export_job import export_recipe
from nasquant.recipe import load_recipe
from nasquant.settings import BOX_BRANCH_LAYERS, PREDICT_NMS
from tests.pipeline.recipes import recipe_from_calibration_images
from tests.shared import shared_path

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "shapes_s_int8.yaml"


def test_an_export_recipe_from_calibration_images_keeps_the_box_branch_in_float() -> None:
    recipe = recipe_from_calibration_images()
    assert recipe.quantization.skip == list(BOX_BRANCH_LAYERS)
    assert recipe.export.nms and recipe.export.nms_settings == PREDICT_NMS
    assert recipe.validation.data is None and Path(recipe.calibration.data).is_absolute()
    # a recipe file keeps its own choices; the model is the one being exported
    other = shared_path("fixtures", "yolo_nas_s_shapes.safetensors")
    from_file = export_recipe(
        RECIPE, checkpoint=str(other), calib=None, imgsz=None, dynamic_batch=True, nms=None
    )
    assert from_file.model.checkpoint == str(other) and from_file.export.dynamic_batch
    original = load_recipe(RECIPE)
    assert (from_file.quantization.skip, from_file.export.nms) == (
        original.quantization.skip,
        original.export.nms,
    )
    with pytest.raises(NasquantError, match="calibration images"):
        export_recipe(None, checkpoint=str(other), calib=None, imgsz=None, dynamic_batch=False, nms=None)


def test_onnx_int8_export_writes_end_to_end_flavours_and_reuses_its_stages(tmp_path: Path) -> None:
    lines: list[str] = []
    recipe, output = recipe_from_calibration_images(), tmp_path / "run"
    result = run_export(recipe, "onnx-int8", output=output, progress=False, log=lines.append)
    assert [p.name for p in result.files] == ["model.int8-nms.trt.onnx", "model.int8-nms.cpu.onnx"]
    for path in result.files:
        graph = onnx.load(str(path), load_external_data=False)
        assert [o.name for o in graph.graph.output] == list(END_TO_END_OUTPUT_NAMES)
        assert read_metadata(path)[KEY_PRECISION] == "int8"
    for name in (
        "model.int8.trt.onnx",
        "model.int8.cpu.onnx",
        "model.fp32.onnx",
        DEPLOY_MD,
        CALIBRATION_NAME,
    ):
        assert (result.run_dir / name).is_file(), name
    assert not (result.run_dir / "model.int8-all.trt.onnx").exists()  # no baseline: nothing compares it
    assert not any("evaluate" in line for line in lines)  # nothing validated or timed
    lines.clear()
    again = run_export(recipe, "onnx-int8", output=output, progress=False, log=lines.append)
    assert again.files == result.files
    assert sum("(reused)" in line for line in lines) >= 3  # calibrate, export model.fp32, model.int8


def test_an_int8_engine_export_without_tensorrt_is_refused_before_calibrating(tmp_path: Path) -> None:
    reason = tensorrt_unavailable()
    if reason is None:
        pytest.skip("TensorRT and a GPU are here: the engine export builds")
    with pytest.raises(NasquantError, match=f"cannot \\({reason}\\).*onnx-int8"):
        run_export(
            recipe_from_calibration_images(),
            "engine",
            output=tmp_path / "run",
            progress=False,
            log=lambda _: None,
        )
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="OpenVINO is not installed")
def test_openvino_int8_export_converts_the_cpu_flavour(tmp_path: Path) -> None:
    result = run_export(
        recipe_from_calibration_images(nms=None),
        "openvino",
        output=tmp_path / "run",
        progress=False,
        log=lambda _: None,
    )
    xml, weights = result.files
    assert (xml.name, weights.name) == ("model.int8.cpu.xml", "model.int8.cpu.bin")
    # int8 weights; OpenVINO keeps a quantized model's float layers (the box branch) in f32
    assert weights.stat().st_size < 0.35 * (result.run_dir / "model.fp32.onnx").stat().st_size
    assert read_metadata(xml) == read_metadata(result.run_dir / "model.int8.cpu.onnx")
    # the stem reads the image space-to-depth on ONNX Runtime only; OpenVINO gets the strided conv
    import openvino as ov

    stem_ops = {node.op_type for node in onnx.load(str(result.run_dir / "model.int8.cpu.onnx")).graph.node}
    assert "SpaceToDepth" in stem_ops
    assert "SpaceToDepth" not in {op.get_type_name() for op in ov.Core().read_model(str(xml)).get_ops()}


def _conv_biases(path: Path) -> dict[str, np.ndarray]:
    graph = onnx.load(str(path)).graph
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    return {
        node.name: values[node.input[2]]
        for node in graph.node
        if node.op_type == "Conv" and len(node.input) > 2
    }


def test_bias_correction_corrects_each_flavour_on_its_own_grids(tmp_path: Path) -> None:
    graphs = {}
    for corrected in (False, True):
        base = recipe_from_calibration_images(nms=None)
        recipe = replace(base, quantization=replace(base.quantization, bias_correction=corrected))
        lines: list[str] = []
        result = run_export(
            recipe, "onnx-int8", output=tmp_path / str(corrected), progress=False, log=lines.append
        )
        graphs[corrected] = {p.name.split(".")[-2]: _conv_biases(p) for p in result.files}
        assert sum("bias correction" in line for line in lines) == (2 if corrected else 0)
    stem = next(name for name in graphs[False]["trt"] if "stem" in name)
    float_conv = next(name for name in graphs[False]["trt"] if "reg_pred" in name)
    plain, corrected = graphs[False], graphs[True]
    # without it both flavours carry the calibrated model's biases; with it, each its own correction
    np.testing.assert_array_equal(plain["trt"][stem], plain["cpu"][stem])
    for flavour in ("trt", "cpu"):
        assert not np.array_equal(corrected[flavour][stem], plain[flavour][stem]), flavour
        np.testing.assert_array_equal(
            corrected[flavour][float_conv], plain[flavour][float_conv]
        )  # float layer
    assert not np.array_equal(corrected["trt"][stem], corrected["cpu"][stem])
