"""OpenVINO backend and IR export: agreement with ONNX Runtime (FP32 to float rounding, INT8 to INT8's
own error), pinned f32 compute, IR round trip with metadata, fixed-batch padding, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from nasquant import NAS
from nasquant.artifacts import KEY_NAMES, read_metadata
from nasquant.data.datasets import iter_batches, load_dataset
from nasquant.errors import NasquantError
from nasquant.export import export_onnx
from nasquant.export.openvino import export_openvino
from nasquant.runtime import Backend, OnnxRuntimeBackend, OpenVINOBackend, open_backend
from tests.crafted import identity_model, onnx_model
from tests.shared import shared_path

ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'nasquant[openvino]')")

#: anchors whose best FP32 class score is above this are the ones a detector keeps: where INT8 must agree
CONFIDENT = 0.5


@pytest.fixture(scope="module")
def images(shapes_nas: NAS) -> np.ndarray:
    """Four preprocessed validation images of the shapes data set (real objects: confident anchors)."""
    dataset = load_dataset(shared_path("data", "shapes", "val"))
    return next(iter(iter_batches(dataset, shapes_nas.preprocessing(), 4))).images


def _ort(path: Path, images: np.ndarray, level: ort.GraphOptimizationLevel | None = None) -> list[np.ndarray]:
    """ONNX Runtime's outputs on CPU, one image at a time (the FP32 fixture has a fixed batch of 1)."""
    options = ort.SessionOptions()
    if level is not None:
        options.graph_optimization_level = level
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    runs = [session.run(["boxes", "scores"], {"images": image[None]}) for image in images]
    return [np.concatenate(outputs) for outputs in zip(*runs, strict=True)]


def _ov(backend: OpenVINOBackend, images: np.ndarray) -> list[np.ndarray]:
    runs = (
        [backend.run(image[None]) for image in images] if backend.batch_size == 1 else [backend.run(images)]
    )
    return [np.concatenate(outputs) for outputs in zip(*runs, strict=True)]


@pytest.fixture(scope="module")
def fp32_ir(fp32_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FP32 graph's IR; also what the tests that are not about ONNX open (an IR loads in 0.1 s, an
    ONNX graph goes through OpenVINO's converter, about 1.5 s)."""
    return export_openvino(fp32_onnx, tmp_path_factory.mktemp("ir") / "model.fp32.xml")


@pytest.fixture(scope="module")
def fp32_reference(fp32_onnx: Path, images: np.ndarray) -> list[np.ndarray]:
    return _ort(fp32_onnx, images)


def test_fp32_onnx_runs_at_f32_and_agrees_with_onnxruntime(
    fp32_onnx: Path, images: np.ndarray, fp32_reference: list[np.ndarray]
) -> None:
    with OpenVINOBackend(fp32_onnx, threads=2) as backend:
        assert isinstance(backend, Backend)
        assert (backend.name, backend.precision, backend.device) == ("openvino", "fp32", "cpu")
        assert (backend.batch_size, backend.input_size, backend.end_to_end) == (1, 320, False)
        assert backend.metadata == read_metadata(fp32_onnx)
        # Pinned: OpenVINO's CPU default is bf16 wherever the CPU has it (AVX-512 BF16, AMX).
        compiled = backend.compiled_model
        assert compiled.get_property(ov.properties.hint.inference_precision) == ov.Type.f32
        assert compiled.get_property(ov.properties.inference_num_threads) == 2
        assert compiled.get_property(ov.properties.num_streams) == 1
        assert (backend.inference_precision, backend.describe()) == ("f32", "openvino fp32 on cpu")
        boxes, scores = _ov(backend, images)
    # OpenVINO f32 sums the same float32 products in another order, as ONNX Runtime does when its graph
    # optimizations fuse the graph: allow ten times ONNX Runtime's own optimized-vs-unoptimized gap, and
    # at least ten float32 epsilons of the values' magnitude. (bf16 compute misses this by >100x.)
    raw = _ort(fp32_onnx, images, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    for ours, reference, plain in zip((boxes, scores), fp32_reference, raw, strict=True):
        own_gap = np.abs(reference - plain).max()
        bound = 10 * max(own_gap, np.finfo(np.float32).eps * np.abs(reference).max())
        assert np.abs(ours - reference).max() <= bound


def test_ir_round_trip_keeps_outputs_metadata_and_fp32_weights(
    fp32_onnx: Path, fp32_ir: Path, images: np.ndarray, tmp_path: Path
) -> None:
    assert sorted(p.name for p in fp32_ir.parent.iterdir()) == ["model.fp32.bin", "model.fp32.xml"]  # no temp
    assert read_metadata(fp32_ir) == read_metadata(fp32_onnx)
    # FP32 weights kept: the .bin is as large as the ONNX file's weights (no FP16 compression).
    assert fp32_ir.with_suffix(".bin").stat().st_size > 0.95 * fp32_onnx.stat().st_size
    with OpenVINOBackend(fp32_onnx) as from_onnx, OpenVINOBackend(fp32_ir) as from_ir:
        assert from_ir.metadata == from_onnx.metadata and from_ir.metadata[KEY_NAMES]
        assert (from_ir.precision, from_ir.batch_size, from_ir.input_size) == ("fp32", 1, 320)
        # ONNX is opened through the same converter the export uses: the same model, the same numbers.
        for ours, theirs in zip(from_ir.run(images[:1]), from_onnx.run(images[:1]), strict=True):
            np.testing.assert_array_equal(ours, theirs)

    # Written over an existing IR (a copy of the FP32 one): both files are replaced, the pair matches.
    half = tmp_path / "model.xml"
    for suffix in (".xml", ".bin"):
        half.with_suffix(suffix).write_bytes(fp32_ir.with_suffix(suffix).read_bytes())
    export_openvino(fp32_onnx, half, compress_to_fp16=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.xml"]
    assert half.with_suffix(".bin").stat().st_size < 0.55 * fp32_ir.with_suffix(".bin").stat().st_size
    with OpenVINOBackend(half) as backend:
        assert backend.precision == "fp16"  # the file holds FP16 weights, and says so
        backend.run(images[:1])


def test_int8_trt_flavour_runs_int8_and_agrees_with_onnxruntime_on_confident_anchors(
    flavors: dict[str, Path],
    fp32_onnx: Path,
    images: np.ndarray,
    fp32_reference: list[np.ndarray],
    tmp_path: Path,
) -> None:
    int8 = flavors["trt"]
    with OpenVINOBackend(int8) as backend:
        assert (backend.precision, backend.batch_size, backend.input_size) == ("int8", None, 320)
        # Really INT8: the CPU plugin runs the convolutions on integer kernels, not FakeQuantize in float.
        runtime_precisions = {
            op.get_rt_info()["runtimePrecision"].astype(str)
            for op in backend.compiled_model.get_runtime_model().get_ordered_ops()
            if op.get_rt_info()["layerType"].astype(str) == "Convolution"
        }
        assert runtime_precisions <= {"u8", "i8"}
        boxes, scores = backend.run(images)
    ort_boxes, ort_scores = _ort(int8, images)
    fp32_boxes, fp32_scores = fp32_reference
    confident = fp32_scores.max(-1) > CONFIDENT
    assert confident.sum() >= 20

    def worst(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).max(-1)[confident].max())

    # Two INT8 runs of one graph round different values across grid steps, so they differ by about as
    # much as INT8 differs from FP32. ONNX Runtime's INT8 error here, measured, is the yardstick: if
    # OpenVINO's own error is at most twice it, the two runs are within three times it of each other.
    assert worst(scores, ort_scores) <= 3 * worst(ort_scores, fp32_scores)
    assert worst(boxes, ort_boxes) <= 3 * worst(ort_boxes, fp32_boxes)
    np.testing.assert_array_equal(scores.argmax(-1)[confident], fp32_scores.argmax(-1)[confident])

    # The INT8 IR keeps int8 weights (a quarter of the FP32 graph's size, like the INT8 ONNX) and runs
    # the very model the ONNX graph runs: both go through OpenVINO's converter. (core.read_model on the
    # ONNX skips the converter's transformations and computes this graph differently.)
    xml = export_openvino(int8, tmp_path / "model.int8.xml")
    assert xml.with_suffix(".bin").stat().st_size < 0.3 * fp32_onnx.stat().st_size
    with OpenVINOBackend(xml) as from_ir:
        assert from_ir.precision == "int8"
        for ours, theirs in zip(from_ir.run(images), (boxes, scores), strict=True):
            np.testing.assert_array_equal(ours, theirs)


def test_a_short_batch_is_padded_on_a_fixed_batch_graph(shapes_nas: NAS, tmp_path: Path) -> None:
    path = export_onnx(shapes_nas.model, tmp_path / "batch2.onnx", imgsz=64, batch=2)
    images = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    with OpenVINOBackend(path, threads=1) as backend:
        assert backend.batch_size == 2
        boxes, scores = backend.run(images[:1])
        full_boxes, full_scores = backend.run(np.concatenate([images[:1], np.zeros_like(images[:1])]))
        with pytest.raises(NasquantError, match="batch2.onnx takes batches of 1 to 2, got 3"):
            backend.run(images)
        with pytest.raises(NasquantError, match=r"takes \(N, 3, 64, 64\) inputs"):
            backend.run(np.zeros((1, 3, 32, 32), np.float32))
    assert boxes.shape == (1, 84, 4) and scores.shape == (1, 84, 6) and boxes.dtype == np.float32
    np.testing.assert_array_equal(boxes, full_boxes[:1])
    np.testing.assert_array_equal(scores, full_scores[:1])


def test_a_foreign_ir_without_metadata_reads_its_precision_from_the_graph(tmp_path: Path) -> None:
    xml = tmp_path / "foreign.xml"
    ov.save_model(ov.convert_model(str(identity_model(tmp_path / "foreign.onnx", quantized=True))), str(xml))
    assert read_metadata(xml) == {}
    with OpenVINOBackend(xml) as backend:
        assert (backend.metadata, backend.precision, backend.batch_size, backend.input_size) == (
            {},
            "int8",
            None,
            8,
        )
        boxes, _ = backend.run(np.full((3, 3, 8, 8), 0.5, np.float32))
    np.testing.assert_allclose(boxes, 0.5)


def test_precision_device_and_thread_choices(fp32_ir: Path) -> None:
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" in capabilities:  # a separate, labelled choice where the CPU computes in it
        with OpenVINOBackend(fp32_ir, inference_precision="bf16") as backend:
            assert backend.inference_precision == "bf16"
            assert backend.describe() == "openvino fp32 on cpu (bf16 compute)"
    else:
        with pytest.raises(NasquantError):
            OpenVINOBackend(fp32_ir, inference_precision="bf16")
    if "FP16" not in capabilities:  # OpenVINO would run f16 as bf16 (or f32) without a word: refused
        with pytest.raises(NasquantError, match="this CPU runs OpenVINO inference precision f16 as"):
            OpenVINOBackend(fp32_ir, inference_precision="f16")
    with pytest.raises(NasquantError, match="unknown OpenVINO inference precision 'int8'"):
        OpenVINOBackend(fp32_ir, inference_precision="int8")
    with pytest.raises(NasquantError, match="threads must be at least 1"):
        OpenVINOBackend(fp32_ir, threads=0)
    with pytest.raises(NasquantError, match="runs on the CPU only, not 'cuda:0'") as error:
        OpenVINOBackend(fp32_ir, device="cuda:0")
    assert "\n" not in str(error.value)
    with pytest.raises(NasquantError, match="unknown device 'tpu'"):
        OpenVINOBackend(fp32_ir, device="tpu")
    assert OpenVINOBackend(fp32_ir, device="auto").device == "cpu"


def test_missing_and_corrupt_files_are_one_line_errors(fp32_ir: Path, tmp_path: Path) -> None:
    garbage_onnx, garbage_xml = tmp_path / "garbage.onnx", tmp_path / "garbage.xml"
    garbage_onnx.write_bytes(b"this is not a protobuf")
    garbage_xml.write_bytes(b"this is not XML")
    garbage_xml.with_suffix(".bin").write_bytes(b"")
    lonely = tmp_path / "lonely.xml"
    lonely.write_bytes(fp32_ir.read_bytes())  # an IR whose .bin was not copied along
    cases = {
        tmp_path / "missing.onnx": "OpenVINO model not found",
        tmp_path / "missing.xml": "OpenVINO model not found",
        garbage_onnx: "cannot read ONNX model",
        garbage_xml: "cannot load OpenVINO IR .*garbage.xml: Unable to read the model",
        lonely: "its weights file lonely.bin is not beside it",
        tmp_path / "model.pt": "OpenVINO runs .onnx graphs and .xml IR, not .pt",
    }
    for path, message in cases.items():
        with pytest.raises(NasquantError, match=message) as error:
            OpenVINOBackend(path)
        assert "\n" not in str(error.value)
    truncated = tmp_path / "truncated.xml"
    truncated.write_bytes(fp32_ir.read_bytes())
    truncated.with_suffix(".bin").write_bytes(fp32_ir.with_suffix(".bin").read_bytes()[:1000])
    with pytest.raises(NasquantError, match="Incorrect weights in bin file") as error:
        OpenVINOBackend(truncated)
    assert "\n" not in str(error.value)


def test_export_refuses_bad_paths_and_unconvertible_graphs_leaving_nothing(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.onnx"
    graph = helper.make_graph(
        [helper.make_node("FooBar", ["images"], ["boxes"], domain="custom")],
        "foreign",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    model = onnx_model(graph)
    model.opset_import.append(helper.make_opsetid("custom", 1))
    onnx.save(model, str(foreign))
    out = tmp_path / "out"
    with pytest.raises(NasquantError, match="OpenVINO cannot convert .*custom.FooBar") as error:
        export_openvino(foreign, out / "model.xml")
    assert "\n" not in str(error.value)
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(NasquantError, match="ONNX model not found"):
        export_openvino(tmp_path / "missing.onnx", out / "model.xml")
    with pytest.raises(NasquantError, match="an OpenVINO IR is written as .xml"):
        export_openvino(foreign, out / "model.bin")
    with pytest.raises(NasquantError, match="OpenVINO IR not found"):
        read_metadata(out / "model.xml")


def test_close_is_idempotent(fp32_ir: Path, images: np.ndarray) -> None:
    backend = OpenVINOBackend(fp32_ir)
    backend.close()
    backend.close()
    assert backend.closed
    with pytest.raises(NasquantError, match="is closed"):
        backend.run(images[:1])


def test_open_backend_dispatch(fp32_onnx: Path, fp32_ir: Path, tmp_path: Path) -> None:
    with open_backend(fp32_ir) as backend:
        assert isinstance(backend, OpenVINOBackend)
    with open_backend(fp32_onnx, runtime="openvino", threads=1) as backend:
        assert isinstance(backend, OpenVINOBackend)
    with open_backend(fp32_onnx) as backend, open_backend(fp32_onnx, runtime="onnxruntime") as explicit:
        assert isinstance(backend, OnnxRuntimeBackend) and isinstance(explicit, OnnxRuntimeBackend)
    with pytest.raises(NasquantError, match="unknown runtime 'tvm'; expected one of onnxruntime, openvino"):
        open_backend(fp32_onnx, runtime="tvm")
    with pytest.raises(NasquantError, match="runtime 'onnxruntime' cannot run model.fp32.xml"):
        open_backend(fp32_ir, runtime="onnxruntime")
    with pytest.raises(NasquantError, match="runtime 'openvino' cannot run model.engine"):
        open_backend(tmp_path / "model.engine", runtime="openvino")
    with pytest.raises(NasquantError, match="runs on the CPU only"):
        open_backend(fp32_ir, device="cuda")


def test_without_openvino_the_backend_says_how_to_install_it(
    fp32_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(NasquantError, match=r"needs OpenVINO: pip install 'nasquant\[openvino\]'"):
        OpenVINOBackend(fp32_onnx)
    with pytest.raises(NasquantError, match=r"needs OpenVINO: pip install 'nasquant\[openvino\]'"):
        export_openvino(fp32_onnx, tmp_path / "model.xml")


def test_importing_the_runtime_package_loads_no_openvino() -> None:
    code = "import sys, nasquant.runtime; print('openvino' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False"]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4), xyxy."""
    top_left, bottom_right = (
        np.maximum(a[:, None, :2], b[None, :, :2]),
        np.minimum(a[:, None, 2:], b[None, :, 2:]),
    )
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=-1)
    area = lambda boxes: np.prod(boxes[:, 2:] - boxes[:, :2], axis=-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def test_the_tensorrt_flavour_gives_onnxruntimes_detections_on_openvino(
    flavors: dict[str, Path], shapes_nas: NAS
) -> None:
    # The cross-runtime fidelity check (benchmarks/openvino.md): the graph made for TensorRT, run by the
    # two CPU runtimes, ends in the same detections. Stated tolerance: every ONNX Runtime detection
    # scoring 0.5 or more has an OpenVINO one of the same class overlapping it at IoU >= 0.9 with a
    # score within 0.05, on 16 validation images; an INT8 value on the edge of a grid step may round
    # the other way in another runtime's kernels, which moves a score by about one step, not more.
    from nasquant.eval.postprocess import detect
    from nasquant.settings import PREDICT_NMS

    dataset = load_dataset(shared_path("data", "shapes", "val")).first(16)
    batch = np.concatenate([b.images for b in iter_batches(dataset, shapes_nas.preprocessing(), 8)])
    with OnnxRuntimeBackend(flavors["trt"]) as ort_backend, OpenVINOBackend(flavors["trt"]) as ov_backend:
        wanted, got = detect(ort_backend, batch, PREDICT_NMS), detect(ov_backend, batch, PREDICT_NMS)
    checked = 0
    for want, have in zip(wanted, got, strict=True):
        for box, score, cls in zip(want.boxes, want.scores, want.class_ids, strict=True):
            if score < 0.5:
                continue
            checked += 1
            same = have.class_ids == cls
            overlap = _iou(box[None], have.boxes[same])[0] if same.any() else np.zeros(0)
            assert overlap.size and overlap.max() >= 0.9, (box, score, cls)
            assert abs(have.scores[same][overlap.argmax()] - score) <= 0.05
    assert checked >= 16  # the fixture finds shapes in every image


def test_a_simplified_selective_graph_runs_every_quantized_conv_on_integer_kernels(
    calibrated, tmp_path: Path
) -> None:
    # The pipeline's graphs are simplified (onnxslim); a tied weight zero point once left 37 of them in
    # f32 on OpenVINO, at 0.47x NNCF's speed (benchmarks/openvino.md).
    from nasquant.quant import keep_in_float

    float_layers = ["heads.head*.reg_convs.*", "heads.head*.reg_pred"]
    selective, kept = keep_in_float(calibrated, float_layers)
    path = export_onnx(selective, tmp_path / "sel.trt.onnx", imgsz=320, simplify=True)
    with OpenVINOBackend(path) as backend:
        precisions = [
            op.get_rt_info()["runtimePrecision"].astype(str)
            for op in backend.compiled_model.get_runtime_model().get_ordered_ops()
            if op.get_rt_info()["layerType"].astype(str) in ("Convolution", "Deconvolution")
        ]
    assert precisions.count("f32") == len(kept) == 6  # the box branch, kept in float on purpose
    assert len(precisions) - 6 >= 90 and set(precisions) <= {"f32", "u8", "i8"}
