"""The NAS facade: the public contract other tools rely on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nasquant import NAS
from nasquant.data.preprocess import read_image
from nasquant.errors import NasquantError
from tests.shared import shared_path


@pytest.fixture(scope="module")
def nas() -> NAS:
    return NAS(shared_path("fixtures", "yolo_nas_s_shapes.pt"))


def test_facade_exposes_module_names_and_input_size(nas: NAS) -> None:
    assert isinstance(nas.model, torch.nn.Module) and not nas.model.training
    assert nas.names == ["circle", "square", "triangle", "star", "cross", "ring"]
    assert nas.variant == "yolo_nas_s" and nas.imgsz == 320


def test_call_path_and_array_give_the_same_detections(nas: NAS) -> None:
    image_path = sorted(shared_path("data", "shapes", "val", "images").glob("*.jpg"))[3]
    (from_path,) = nas(image_path)
    (from_array,) = nas.predict(read_image(image_path))
    assert len(from_path) > 0
    np.testing.assert_array_equal(from_path.boxes, from_array.boxes)
    np.testing.assert_array_equal(from_path.class_ids, from_array.class_ids)
    assert from_path.scores.min() >= 0.25  # interactive default confidence
    assert from_path.boxes[:, 2].max() <= from_path.width and from_path.boxes[:, 3].max() <= from_path.height


def test_predict_on_a_folder_returns_one_result_per_image(nas: NAS, tmp_path: Path) -> None:
    images = sorted(shared_path("data", "shapes", "val", "images").glob("*.jpg"))[:3]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    results = nas.predict(folder, conf=0.5, save_dir=tmp_path / "out")
    assert [Path(r.source).name for r in results] == [i.name for i in images]
    assert all(r.scores.min(initial=1.0) >= 0.5 for r in results)
    assert len(list((tmp_path / "out").glob("*.jpg"))) == 3


def test_predict_never_writes_over_its_inputs(nas: NAS, tmp_path: Path) -> None:
    image = sorted(shared_path("data", "shapes", "val", "images").glob("*.jpg"))[0]
    source = tmp_path / image.name
    source.write_bytes(image.read_bytes())
    for out in (tmp_path, tmp_path / "."):
        with pytest.raises(NasquantError, match="holds the input .* annotated images would replace inputs"):
            nas.predict(source, save_dir=out)
    assert source.read_bytes() == image.read_bytes() and sorted(tmp_path.iterdir()) == [source]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NasquantError, match="output folder .*file is a file"):
        nas.predict(source, save_dir=tmp_path / "file")


def test_a_state_dict_mismatch_names_the_key(nas: NAS) -> None:
    from dataclasses import replace

    from nasquant.detector import load_model

    tensors = dict(nas.checkpoint.state_dict)
    key = "heads.head2.reg_pred.bias"
    del tensors[key]
    with pytest.raises(NasquantError, match=rf"does not fit yolo_nas_s: no tensor {key}$"):
        load_model(replace(nas.checkpoint, state_dict=tensors))
    tensors[key] = torch.zeros(3)
    with pytest.raises(NasquantError, match=rf"{key} has shape \(3,\), the network needs \(68,\)"):
        load_model(replace(nas.checkpoint, state_dict=tensors))


def test_val_on_a_dataset_with_other_classes_is_a_clear_error(nas: NAS) -> None:
    coco = shared_path("data", "coco-mini", "annotations", "instances_val2017.json")
    with pytest.raises(NasquantError, match="predicts 6 classes but .* has 80"):
        nas.val(data=coco, progress=False)


def test_input_size_must_be_a_multiple_of_the_largest_stride(nas: NAS) -> None:
    with pytest.raises(NasquantError, match="multiple of 32 from 32 to 8192, got 330"):
        nas.preprocessing("sg", 330)
    for size in (0, -32, 8224):
        with pytest.raises(NasquantError, match=f"got {size}"):
            nas.preprocessing("sg", size)
    assert nas.preprocessing("letterbox", 640).resize == 640


def test_export_writes_fp32_onnx_with_the_models_metadata(nas: NAS, tmp_path: Path) -> None:
    from nasquant.artifacts import read_metadata
    from nasquant.runtime import OnnxRuntimeBackend

    path = nas.export(tmp_path / "fixture.onnx", simplify=False)
    metadata = read_metadata(path)
    assert json.loads(metadata["nasquant.names"]) == nas.names
    assert metadata["nasquant.input_size"] == "320" and metadata["nasquant.precision"] == "fp32"
    backend = OnnxRuntimeBackend(path, threads=2)
    images = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
    boxes, _ = backend.run(images)
    np.testing.assert_allclose(boxes, nas.backend("cpu").run(images)[0], atol=1e-3)
    assert not nas.model.is_fused, "export fuses a copy; the facade's module is left as loaded"


# --- an exported file is a model too --------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_cpu_onnx(calibrated: torch.nn.Module, nas: NAS, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder's CPU-flavour INT8 graph, with the metadata the pipeline writes into it."""
    from nasquant.artifacts import KEY_FLAVOR
    from nasquant.export import export_onnx, write_cpu_flavor

    folder = tmp_path_factory.mktemp("run")
    trt = export_onnx(
        calibrated,
        folder / "model.int8.trt.onnx",
        imgsz=nas.imgsz,
        metadata={**nas.onnx_metadata(), KEY_FLAVOR: "trt"},
    )
    return write_cpu_flavor(trt, folder / "model.int8.cpu.onnx")


def test_an_exported_int8_graph_opens_reads_itself_and_predicts(nas: NAS, int8_cpu_onnx: Path) -> None:
    exported = NAS(int8_cpu_onnx)
    assert (exported.names, exported.imgsz, exported.variant) == (nas.names, nas.imgsz, nas.variant)
    assert exported.preprocessing() == nas.preprocessing()
    info = exported.info()
    assert (info["format"], info["precision"], info["flavor"], info["num_classes"]) == (
        "onnx",
        "int8",
        "cpu",
        6,
    )
    image = sorted(shared_path("data", "shapes", "val", "images").glob("*.jpg"))[3]
    (int8,), (fp32,) = exported(image), nas(image)
    assert len(int8) and int8.class_ids[0] == fp32.class_ids[0]
    corner_gap = np.abs(int8.boxes[0] - fp32.boxes[0]).max()
    assert corner_gap < 0.05 * max(fp32.height, fp32.width), "the INT8 graph finds the same top shape"
    assert repr(exported) == "NAS(yolo_nas_s, 6 classes, model.int8.cpu.onnx)"


def test_an_exported_file_refuses_what_needs_a_checkpoint(int8_cpu_onnx: Path, tmp_path: Path) -> None:
    exported = NAS(int8_cpu_onnx)
    needs_checkpoint = "is an exported file: export and quantization need the checkpoint it came from"
    with pytest.raises(NasquantError, match=needs_checkpoint):
        exported.export(tmp_path / "again.onnx")
    with pytest.raises(NasquantError, match=needs_checkpoint):
        exported.model  # noqa: B018 - the property is the check
    with pytest.raises(NasquantError, match="runs at its own precision"):
        exported.backend(precision="fp16")
    with pytest.raises(NasquantError, match="holds yolo_nas_s, not yolo_nas_m"):
        NAS(int8_cpu_onnx, variant="yolo_nas_m")
    with pytest.raises(NasquantError, match="has 6 classes, not 80"):
        NAS(int8_cpu_onnx, num_classes=80)
    with pytest.raises(NasquantError, match="does not match the expected"):
        NAS(int8_cpu_onnx, sha256="0" * 64)
    with pytest.raises(NasquantError, match="no such file"):
        NAS(tmp_path / "absent.onnx")
    with pytest.raises(NasquantError, match="takes 320px inputs, not 640"):
        exported.preprocessing(imgsz=640)
