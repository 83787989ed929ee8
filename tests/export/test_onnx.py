"""FP32 ONNX export of the trained shapes fixture: checker, metadata, parity with torch, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import nasquant.export.onnx as export_module
from nasquant import NAS, __version__
from nasquant.artifacts import (
    KEY_INPUT_SIZE,
    KEY_NAMES,
    KEY_PRECISION,
    KEY_VERSION,
    MAX_OPSET,
    MIN_OPSET,
    read_metadata,
)
from nasquant.data.preprocess import preprocess, read_image
from nasquant.errors import NasquantError
from nasquant.export import export_onnx
from nasquant.runtime import OnnxRuntimeBackend
from tests.shared import shared_path

IMGSZ = 320


@pytest.fixture(scope="module")
def nas() -> NAS:
    return NAS(shared_path("fixtures", "yolo_nas_s_shapes.pt")).fuse()


@pytest.fixture(scope="module")
def images(nas: NAS) -> np.ndarray:
    paths = sorted(shared_path("data", "shapes", "val", "images").glob("*.jpg"))[:3]
    return np.stack([preprocess(read_image(p), nas.preprocessing())[0] for p in paths])


@pytest.fixture(scope="module")
def fp32_onnx(nas: NAS, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fp32") / "model.fp32.onnx"
    metadata = {KEY_NAMES: json.dumps(nas.names), "nasquant.protocol": "sg"}
    return export_onnx(nas.model, path, imgsz=IMGSZ, metadata=metadata)


def _torch(nas: NAS, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        boxes, scores = nas.model(torch.from_numpy(images))
    return boxes.numpy(), scores.numpy()


def test_fp32_export_passes_the_checker_and_keeps_its_metadata(nas: NAS, fp32_onnx: Path) -> None:
    onnx.checker.check_model(str(fp32_onnx), full_check=True)
    model = onnx.load(str(fp32_onnx))
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["boxes", "scores"]
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, IMGSZ, IMGSZ]
    assert model.opset_import[0].version == 17
    assert read_metadata(fp32_onnx) == {
        KEY_VERSION: __version__,
        KEY_PRECISION: "fp32",  # no QuantizeLinear in the graph
        KEY_NAMES: json.dumps(nas.names),
        "nasquant.protocol": "sg",
        KEY_INPUT_SIZE: str(IMGSZ),
    }
    assert json.loads(read_metadata(fp32_onnx)[KEY_NAMES]) == [
        "circle",
        "square",
        "triangle",
        "star",
        "cross",
        "ring",
    ]


def test_onnxruntime_fp32_matches_torch_on_real_images(nas: NAS, fp32_onnx: Path, images: np.ndarray) -> None:
    backend = OnnxRuntimeBackend(fp32_onnx, threads=2)
    for image in images:  # the graph has a fixed batch of 1
        boxes, scores = backend.run(image[None])
        ref_boxes, ref_scores = _torch(nas, image[None])
        assert boxes.shape == (1, 2100, 4) and scores.shape == (1, 2100, 6)
        assert np.abs(boxes - ref_boxes).max() <= 1e-3
        assert np.abs(scores - ref_scores).max() <= 1e-5


def test_dynamic_batch_runs_one_and_three_images(nas: NAS, images: np.ndarray, tmp_path: Path) -> None:
    path = export_onnx(nas.model, tmp_path / "dynamic.onnx", imgsz=IMGSZ, dynamic_batch=True)
    first_dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert first_dim.dim_param == "batch"
    backend = OnnxRuntimeBackend(path, threads=2)
    assert backend.batch_size is None and backend.input_size == IMGSZ
    for batch in (images[:1], images):
        boxes, scores = backend.run(batch)
        ref_boxes, ref_scores = _torch(nas, batch)
        assert len(boxes) == len(batch)
        assert np.abs(boxes - ref_boxes).max() <= 1e-3
        assert np.abs(scores - ref_scores).max() <= 1e-5


def test_export_leaves_the_module_as_it_was(nas: NAS, tmp_path: Path) -> None:
    before = {k: v.clone() for k, v in nas.model.state_dict().items()}
    nas.model.train()
    try:
        export_onnx(nas.model, tmp_path / "m.onnx", imgsz=64)
        assert nas.model.training  # exported in eval mode, then put back
    finally:
        nas.model.eval()
    after = nas.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_arguments_are_one_line_errors(nas: NAS, tmp_path: Path) -> None:
    with pytest.raises(NasquantError, match="opset must be from 13 .* to 20 .*got 12"):
        export_onnx(nas.model, tmp_path / "a.onnx", imgsz=IMGSZ, opset=12)
    with pytest.raises(NasquantError, match="got 21"):
        export_onnx(nas.model, tmp_path / "a.onnx", imgsz=IMGSZ, opset=21)
    with pytest.raises(NasquantError, match="multiple of 32"):
        export_onnx(nas.model, tmp_path / "a.onnx", imgsz=100)
    with pytest.raises(NasquantError, match="batch size must be at least 1"):
        export_onnx(nas.model, tmp_path / "a.onnx", imgsz=IMGSZ, batch=0)
    with pytest.raises(TypeError, match="must be str"):
        export_onnx(nas.model, tmp_path / "a.onnx", imgsz=64, metadata={"nasquant.stride": 32})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_the_opset_bounds_are_the_installed_exporters() -> None:
    # The recipe reader checks export.opset against these without importing torch or onnx.
    from torch.onnx import _constants

    assert MIN_OPSET == 13 and MAX_OPSET == _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    assert onnx.defs.onnx_opset_version() >= MAX_OPSET


def test_read_metadata_of_missing_or_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(NasquantError, match="ONNX model not found"):
        read_metadata(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07\x12\xff\xff\xff\xff")
    with pytest.raises(NasquantError, match="cannot read ONNX model"):
        read_metadata(corrupt)


def test_a_failed_check_writes_nothing_under_the_final_name(
    nas: NAS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "model.onnx"
    final.write_bytes(b"previous good artifact")

    def reject(*args, **kwargs) -> None:
        raise onnx.checker.ValidationError("rejected by the test")

    monkeypatch.setattr(export_module.onnx.checker, "check_model", reject)
    with pytest.raises(onnx.checker.ValidationError):
        export_onnx(nas.model, final, imgsz=64)
    assert final.read_bytes() == b"previous good artifact"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary file left behind


def test_ctrl_c_during_export_leaves_no_file(
    nas: NAS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(model, args, f, **kwargs) -> None:
        Path(f).write_bytes(b"half a graph")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module.torch.onnx, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(nas.model, tmp_path / "model.onnx", imgsz=64)
    assert list(tmp_path.iterdir()) == []


def test_simplify_keeps_fp32_outputs(nas: NAS, fp32_onnx: Path, images: np.ndarray, tmp_path: Path) -> None:
    path = export_onnx(nas.model, tmp_path / "slim.onnx", imgsz=IMGSZ, simplify=True)
    model = onnx.load(str(path))
    assert not any(node.op_type == "Constant" for node in model.graph.node)  # folded into initializers
    assert read_metadata(path)[KEY_PRECISION] == "fp32"
    plain = OnnxRuntimeBackend(fp32_onnx, optimization_level="disable").run(images[:1])
    slim = OnnxRuntimeBackend(path, optimization_level="disable").run(images[:1])
    np.testing.assert_array_equal(plain[0], slim[0])
    np.testing.assert_array_equal(plain[1], slim[1])
