"""ONNX Runtime backend: the Backend contract, fixed-batch handling, clear errors, optimized-graph ops."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from nasquant import NAS
from nasquant.artifacts import KEY_NAMES
from nasquant.errors import NasquantError
from nasquant.export import export_onnx
from nasquant.runtime import Backend, OnnxRuntimeBackend, optimized_op_types
from tests.crafted import identity_model
from tests.shared import shared_path

IMGSZ = 64  # small: these tests are about the runtime wrapper, not accuracy


@pytest.fixture(scope="module")
def nas() -> NAS:
    return NAS(shared_path("fixtures", "yolo_nas_s_shapes.pt")).fuse()


@pytest.fixture(scope="module")
def batch2_onnx(nas: NAS, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ort") / "model.onnx"
    return export_onnx(nas.model, path, imgsz=IMGSZ, batch=2, metadata={KEY_NAMES: '["a"]'})


def test_backend_contract_and_properties(batch2_onnx: Path) -> None:
    backend = OnnxRuntimeBackend(batch2_onnx, device="cpu", threads=1)
    assert isinstance(backend, Backend)
    assert (backend.name, backend.precision, backend.device) == ("onnxruntime", "fp32", "cpu")
    assert backend.describe() == "onnxruntime fp32 on cpu"
    assert (backend.batch_size, backend.input_size) == (2, IMGSZ)
    assert backend.metadata[KEY_NAMES] == '["a"]'


def test_a_partial_batch_is_padded_and_a_larger_one_refused(nas: NAS, batch2_onnx: Path) -> None:
    backend = OnnxRuntimeBackend(batch2_onnx, threads=1)
    images = np.random.default_rng(0).random((3, 3, IMGSZ, IMGSZ), dtype=np.float32)
    boxes, scores = backend.run(images[:1])
    with torch.no_grad():
        ref_boxes, ref_scores = nas.model(torch.from_numpy(images[:1]))
    assert boxes.shape == (1, 84, 4) and scores.shape == (1, 84, 6) and boxes.dtype == np.float32
    assert np.abs(boxes - ref_boxes.numpy()).max() <= 1e-3
    assert np.abs(scores - ref_scores.numpy()).max() <= 1e-5
    with pytest.raises(
        NasquantError,
        match="model.onnx takes batches of 1 to 2, got 3; use a smaller batch or export with a dynamic batch",
    ):
        backend.run(images)
    with pytest.raises(NasquantError, match=r"takes \(N, 3, 64, 64\) inputs"):
        backend.run(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(NasquantError, match="expected a \\(N, 3, H, W\\) batch"):
        backend.run(np.zeros((3, IMGSZ, IMGSZ), np.float32))


def test_precision_comes_from_the_graph_without_metadata(tmp_path: Path) -> None:
    fp32 = OnnxRuntimeBackend(identity_model(tmp_path / "fp32.onnx", quantized=False))
    int8 = OnnxRuntimeBackend(identity_model(tmp_path / "int8.onnx", quantized=True))
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    assert (fp32.metadata, fp32.batch_size, fp32.input_size) == ({}, None, 8)
    images = np.full((2, 3, 8, 8), 0.5, np.float32)
    np.testing.assert_allclose(int8.run(images)[0], images)


def test_missing_and_corrupt_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(NasquantError, match="ONNX model not found"):
        OnnxRuntimeBackend(tmp_path / "missing.onnx")
    with pytest.raises(NasquantError, match="ONNX model not found"):
        optimized_op_types(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not a protobuf")
    with pytest.raises(NasquantError, match="cannot load ONNX model") as error:
        OnnxRuntimeBackend(corrupt)
    assert "\n" not in str(error.value)


def test_bad_options_are_clear_errors(batch2_onnx: Path) -> None:
    with pytest.raises(NasquantError, match="unknown ONNX Runtime optimization level 'max'"):
        OnnxRuntimeBackend(batch2_onnx, optimization_level="max")
    with pytest.raises(NasquantError, match="threads must be at least 1"):
        OnnxRuntimeBackend(batch2_onnx, threads=0)
    with pytest.raises(NasquantError, match="unknown device 'tpu'"):
        OnnxRuntimeBackend(batch2_onnx, device="tpu")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(NasquantError, match="no CUDA provider"):
            OnnxRuntimeBackend(batch2_onnx, device="cuda")
        assert OnnxRuntimeBackend(batch2_onnx, device="auto").device == "cpu"


def test_optimized_op_types_reports_the_graph_ort_runs(batch2_onnx: Path) -> None:
    written = {node.op_type for node in onnx.load(str(batch2_onnx)).graph.node}
    unoptimized = optimized_op_types(batch2_onnx, optimization_level="disable")
    assert set(unoptimized) == written - {"Constant"}  # ORT always turns Constant nodes into initializers
    assert unoptimized["Conv"] == 98
    assert "Conv" in optimized_op_types(batch2_onnx) and "QuantizeLinear" not in optimized_op_types(
        batch2_onnx
    )


def test_importing_the_runtime_package_loads_no_onnxruntime_or_tensorrt() -> None:
    code = "import sys, nasquant.runtime; print('onnxruntime' in sys.modules, 'tensorrt' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
