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


def _shapes_image(index: int = 3) -> Path:
    return sorted(shared_path("data", "shapes", "val", "images").glob("*.jpg"))[index]


def test_the_ultralytics_example_runs_as_written(nas: NAS, capsys) -> None:
    """``model.info(); results = model.val(data=...); results = model(path)`` as on Ultralytics' page."""
    model = nas
    model.info()
    assert "yolo_nas_s" in capsys.readouterr().out
    metrics = model.val(data=shared_path("data", "shapes", "val_yolo", "shapes_val.yaml"), progress=False)
    table = capsys.readouterr().out
    assert metrics.box.map == metrics.results_dict["map50_95"] == metrics["map50_95"]
    assert metrics.box.map50 == metrics.results_dict["map50"] and metrics.box.maps.shape == (6,)
    assert all(f" {name} " in table for name in nas.names) and "mAP50-95" in table
    assert f"{metrics.box.map:.3f}" in table.splitlines()[2]  # the "all" row
    assert 0 < metrics.box.mp <= 1 and 0 < metrics.box.mr <= 1
    results = model(_shapes_image())
    assert len(results) == 1 and results[0].boxes.xyxy.shape == (len(results[0]), 4)


def test_results_match_the_one_class_per_box_postprocessing(nas: NAS) -> None:
    from dataclasses import replace

    from nasquant.data.preprocess import preprocess
    from nasquant.eval.postprocess import detect
    from nasquant.runtime import TorchBackend
    from nasquant.settings import PREDICT_NMS

    image_path = _shapes_image()
    (result,) = nas(image_path)
    tensor, transform = preprocess(read_image(image_path), nas.preprocessing())
    with TorchBackend(nas.model) as backend:
        (want,) = detect(backend, tensor[None], PREDICT_NMS)
    assert not PREDICT_NMS.multi_label and len(want) > 0
    np.testing.assert_array_equal(result.boxes.xyxy, transform.to_original(want.boxes))
    np.testing.assert_array_equal(result.boxes.conf, want.scores)
    np.testing.assert_array_equal(result.boxes.cls, want.class_ids.astype(np.float32))
    assert result.boxes.conf.min() >= 0.25  # interactive default confidence
    height, width = result.orig_shape
    assert result.boxes.xyxy[:, 2].max() <= width and result.boxes.xyxy[:, 3].max() <= height
    # validation's multi-label NMS, when asked
    with TorchBackend(nas.model) as backend:
        (every_class,) = detect(backend, tensor[None], replace(PREDICT_NMS, multi_label=True))
    multi = nas(image_path, multi_label=True)[0]
    np.testing.assert_array_equal(multi.boxes.conf, every_class.scores)


def test_every_kind_of_image_input_gives_the_same_boxes(nas: NAS) -> None:
    import cv2
    import PIL.Image

    image_path = _shapes_image()
    want = nas(image_path)[0].boxes.data
    bgr = cv2.imread(str(image_path))
    rgb_tensor = torch.from_numpy(bgr[..., ::-1].copy()).permute(2, 0, 1).float() / 255
    inputs = {
        "cv2 BGR array": bgr,
        "PIL RGB": PIL.Image.open(image_path),
        "torch RGB 0-1": rgb_tensor,
        "str path": str(image_path),
    }
    for what, source in inputs.items():
        (got,) = nas(source)
        np.testing.assert_array_equal(got.boxes.data, want, err_msg=what)
        np.testing.assert_array_equal(got.orig_img, bgr, err_msg=what)
    # a batch tensor and a list of mixed inputs give one result each, in order
    assert [len(r) for r in nas(torch.stack([rgb_tensor, rgb_tensor]))] == [len(want)] * 2
    assert [r.path for r in nas([bgr, str(image_path)])] == ["image0", str(image_path)]


def test_predict_on_a_folder_returns_one_result_per_image(nas: NAS, tmp_path: Path) -> None:
    images = [_shapes_image(i) for i in range(3)]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    results = nas.predict(folder, conf=0.5, save_dir=tmp_path / "out")
    assert [Path(r.path).name for r in results] == [i.name for i in images]
    assert all(r.boxes.conf.min(initial=1.0) >= 0.5 for r in results)
    assert len(list((tmp_path / "out").glob("*.jpg"))) == 3
    # a second run gets its own folder: out2, not a mix of old images and a new predictions.json
    again = nas.predict(folder, conf=0.5, save_dir=tmp_path / "out", stream=True)
    assert not isinstance(again, list) and len(list(again)) == 3
    assert len(json.loads((tmp_path / "out2" / "predictions.json").read_text())) == 3


def test_predict_never_writes_over_its_inputs(nas: NAS, tmp_path: Path) -> None:
    image = _shapes_image(0)
    folder = tmp_path / "in"
    folder.mkdir()
    source = folder / image.name
    source.write_bytes(image.read_bytes())
    for out in (folder, folder / "."):
        with pytest.raises(NasquantError, match="holds the input .* annotated images would replace inputs"):
            nas.predict(source, save_dir=out, exist_ok=True)
    assert source.read_bytes() == image.read_bytes() and sorted(folder.iterdir()) == [source]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NasquantError, match="output folder .*file is a file"):
        nas.predict(source, save_dir=tmp_path / "file", exist_ok=True)


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
    assert len(int8) and int8.boxes.cls[0] == fp32.boxes.cls[0]
    corner_gap = np.abs(int8.boxes.xyxy[0] - fp32.boxes.xyxy[0]).max()
    assert corner_gap < 0.05 * max(fp32.orig_shape), "the INT8 graph finds the same top shape"
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
