"""The TensorRT runner. Without TensorRT (CI): clear one-line errors, and nasquant never imports
tensorrt by itself. With TensorRT and a GPU: FP16 and INT8 engines built from the shapes fixture,
checked against ONNX Runtime (accuracy) and against each other (speed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nasquant import NAS
from nasquant.artifacts import KEY_FLAVOR, EngineSidecar, file_sha256, sidecar_path
from nasquant.bench import benchmark_model
from nasquant.cuda import tensorrt_unavailable
from nasquant.data.datasets import load_dataset
from nasquant.data.preprocess import preprocess, read_image
from nasquant.errors import NasquantError
from nasquant.eval.validate import validate
from nasquant.export import export_onnx
from nasquant.export.engine_plan import EngineSettings, EngineSource
from nasquant.export.tensorrt import build_engine
from nasquant.runtime import OnnxRuntimeBackend, open_backend
from nasquant.runtime.tensorrt_backend import TensorRTBackend
from tests.crafted import fake_engine
from tests.shared import shared_path


def test_a_missing_engine_or_sidecar_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NasquantError, match="no such engine file"):
        TensorRTBackend(tmp_path / "model.int8.engine")
    engine = tmp_path / "model.int8.engine"
    engine.write_bytes(b"not really an engine")
    with pytest.raises(NasquantError, match="no sidecar beside the engine"):
        open_backend(engine)  # .engine files go to the TensorRT runner


@pytest.mark.skipif(tensorrt_unavailable() != "tensorrt not installed", reason="TensorRT is installed here")
def test_without_tensorrt_the_runner_says_how_to_get_it(tmp_path: Path) -> None:
    engine = fake_engine(tmp_path / "model.fp16.engine", precision="fp16")
    with pytest.raises(NasquantError, match=r"tensorrt is not installed: pip install 'nasquant\[tensorrt\]'"):
        TensorRTBackend(engine)


def test_importing_nasquant_never_imports_tensorrt() -> None:
    code = (
        "import sys, nasquant, nasquant.cli, nasquant.pipeline, nasquant.export.tensorrt\n"
        "from nasquant.runtime import TensorRTBackend\n"
        "assert 'tensorrt' not in sys.modules, 'tensorrt was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- on a TensorRT machine --------------------------------------------------------------------

needs_tensorrt = pytest.mark.skipif(
    tensorrt_unavailable() is not None, reason=f"needs TensorRT and a CUDA GPU ({tensorrt_unavailable()})"
)


@pytest.fixture(scope="module")
def engines(fp32_onnx: Path, flavors: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("engines")
    fp16 = folder / "model.fp16.engine"
    build_engine(fp32_onnx, fp16, EngineSettings("fp16"))
    int8 = folder / "model.int8.engine"
    profile = EngineSource.inspect(flavors["trt"]).profile(1, 4, 8)
    build_engine(flavors["trt"], int8, EngineSettings("int8", profile))
    return {"fp16": fp16, "int8": int8}


@pytest.fixture(scope="module")
def val_images(shapes_nas: NAS) -> np.ndarray:
    paths = sorted(shared_path("data", "shapes", "val", "images").glob("*.jpg"))[:8]
    return np.stack([preprocess(read_image(p), shapes_nas.preprocessing())[0] for p in paths])


@pytest.mark.gpu
@needs_tensorrt
def test_engines_have_sidecars_that_describe_them(engines: dict, flavors: dict[str, Path]) -> None:
    sidecar = EngineSidecar.read(engines["int8"])
    assert sidecar.precision == "int8" and sidecar.onnx_sha256 == file_sha256(flavors["trt"])
    assert sidecar.profile["max"][0] == 8 and [t.name for t in sidecar.inputs] == ["images"]
    assert sidecar_path(engines["fp16"]).is_file()
    assert engines["int8"].with_suffix(".build.log").is_file()


@pytest.mark.gpu
@needs_tensorrt
def test_fp16_engine_boxes_match_onnxruntime_fp32(
    engines: dict, fp32_onnx: Path, val_images: np.ndarray
) -> None:
    engine, reference = TensorRTBackend(engines["fp16"]), OnnxRuntimeBackend(fp32_onnx)
    for image in val_images:  # the FP32 graph has a fixed batch of 1
        got, want = engine.run(image[None]), reference.run(image[None])
        confident = want[1].max(axis=2) > 0.25
        assert np.abs(got[0][confident] - want[0][confident]).max() < 0.5  # pixels


@pytest.mark.gpu
@needs_tensorrt
def test_int8_engine_map_is_within_0_01_of_onnxruntime_int8(
    engines: dict, flavors: dict[str, Path], shapes_nas: NAS
) -> None:
    dataset = load_dataset(shared_path("data", "shapes", "val", "annotations.json"))
    spec = shapes_nas.preprocessing()
    on_ort = validate(OnnxRuntimeBackend(flavors["cpu"]), dataset, spec, batch_size=8, progress=False)
    on_trt = validate(TensorRTBackend(engines["int8"]), dataset, spec, batch_size=8, progress=False)
    assert abs(on_trt["map50_95"] - on_ort["map50_95"]) < 0.01


@pytest.mark.gpu
@needs_tensorrt
def test_int8_engine_is_faster_than_fp16(
    calibrated: torch.nn.Module, shapes_nas: NAS, tmp_path: Path
) -> None:
    # At 640 and batch 8, where the GPU is busy enough for int8 kernels to show (CUDA-event timing).
    fp32 = shapes_nas.export(tmp_path / "model.fp32.onnx", imgsz=640, dynamic_batch=True)
    int8 = export_onnx(
        calibrated,
        tmp_path / "model.int8.trt.onnx",
        imgsz=640,
        dynamic_batch=True,
        metadata={KEY_FLAVOR: "trt"},
    )
    p50 = {}
    for precision, onnx_path in (("fp16", fp32), ("int8", int8)):
        engine = tmp_path / f"model.{precision}.engine"
        profile = EngineSource.inspect(onnx_path).profile(1, 8, 8)
        build_engine(onnx_path, engine, EngineSettings(precision, profile))
        stats = benchmark_model(TensorRTBackend(engine), imgsz=640, batch=8, iterations=100, progress=False)
        p50[precision] = stats.p50_ms
    assert p50["int8"] < p50["fp16"], p50
