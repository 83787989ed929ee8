"""End-to-end graphs: the NMS tail computes nasquant's own post-processing, in EfficientNMS's outputs."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from nasquant import NAS
from nasquant.artifacts import END_TO_END_OUTPUT_NAMES, KEY_NMS, end_to_end_path, read_metadata
from nasquant.data.preprocess import preprocess, read_image
from nasquant.errors import NasquantError
from nasquant.eval.postprocess import Detections, postprocess
from nasquant.export import append_nms, export_onnx, write_end_to_end
from nasquant.runtime import OnnxRuntimeBackend
from nasquant.settings import PREDICT_NMS, VAL_NMS
from tests.conftest import IMGSZ
from tests.shared import shared_path

SHAPES_VAL = ("data", "shapes", "val", "annotations.json")


@pytest.fixture(scope="module")
def images(shapes_nas: NAS) -> np.ndarray:
    paths = sorted(shared_path("data", "shapes", "val", "images").glob("*.jpg"))[:6]
    return np.stack([preprocess(read_image(p), shapes_nas.preprocessing())[0] for p in paths])


@pytest.fixture(scope="module")
def raw_and_end_to_end(shapes_nas: NAS, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The FP32 graph with a dynamic batch, and its end-to-end copy at the predict settings."""
    folder = tmp_path_factory.mktemp("nms")
    raw = export_onnx(
        shapes_nas.detector.deployed(),
        folder / "model.fp32.onnx",
        imgsz=IMGSZ,
        dynamic_batch=True,
        metadata=shapes_nas.onnx_metadata(),
    )
    return raw, write_end_to_end(raw, end_to_end_path(raw), PREDICT_NMS)


def _assert_same(got: list[Detections], want: list[Detections]) -> None:
    assert len(got) == len(want)
    for image, (g, w) in enumerate(zip(got, want, strict=True)):
        assert len(g) == len(w), image
        np.testing.assert_array_equal(g.class_ids, w.class_ids)
        np.testing.assert_array_equal(g.scores, w.scores)  # the same score tensor, gathered
        np.testing.assert_allclose(g.boxes, w.boxes, atol=1e-4)


def _end_to_end_detections(path: Path, images: np.ndarray) -> list[Detections]:
    from nasquant.eval.postprocess import unpack_end_to_end

    with OnnxRuntimeBackend(path) as backend:
        assert backend.end_to_end
        return unpack_end_to_end(*backend.run(images))


@pytest.mark.parametrize(
    "settings",
    [
        PREDICT_NMS,
        VAL_NMS,
        replace(PREDICT_NMS, iou=0.3, max_det=5),
        replace(PREDICT_NMS, multi_label=not PREDICT_NMS.multi_label),
    ],
)
def test_end_to_end_detections_equal_nasquants_postprocessing(
    raw_and_end_to_end: tuple[Path, Path], images: np.ndarray, settings, tmp_path: Path
) -> None:
    raw, _ = raw_and_end_to_end
    end_to_end = write_end_to_end(raw, tmp_path / "e2e.onnx", settings)
    with OnnxRuntimeBackend(raw) as backend:
        want = postprocess(*backend.run(images), settings)
    got = _end_to_end_detections(end_to_end, images)  # one batch of 6: per-image NMS inside the graph
    assert sum(len(d) for d in want) > len(want)  # the fixture finds shapes: something to compare
    assert max(len(d) for d in want) <= settings.max_det
    _assert_same(got, want)


def test_end_to_end_outputs_follow_the_efficientnms_convention(
    raw_and_end_to_end: tuple[Path, Path], images: np.ndarray
) -> None:
    _, end_to_end = raw_and_end_to_end
    graph = onnx.load(str(end_to_end))
    assert [o.name for o in graph.graph.output] == list(END_TO_END_OUTPUT_NAMES)
    assert any(n.op_type == "NonMaxSuppression" for n in graph.graph.node)  # standard ONNX, no plugin
    assert all(n.domain in ("", "ai.onnx") for n in graph.graph.node)
    with OnnxRuntimeBackend(end_to_end) as backend:
        num_dets, boxes, scores, classes = backend.run(images)
    count, k = len(images), PREDICT_NMS.max_det
    assert (num_dets.shape, boxes.shape, scores.shape, classes.shape) == (
        (count, 1),
        (count, k, 4),
        (count, k),
        (count, k),
    )
    assert (num_dets.dtype, boxes.dtype, scores.dtype, classes.dtype) == (
        np.int32,
        np.float32,
        np.float32,
        np.int32,
    )
    for n, b, s, c in zip(num_dets[:, 0], boxes, scores, classes, strict=True):
        assert np.all(s[:n] > PREDICT_NMS.conf) and np.all(np.diff(s[:n]) <= 0)  # best first
        assert not b[n:].any() and not s[n:].any() and not c[n:].any()  # zero padding
    metadata = read_metadata(end_to_end)
    assert json.loads(metadata[KEY_NMS]) == asdict(PREDICT_NMS)
    raw_metadata = read_metadata(raw_and_end_to_end[0])
    assert KEY_NMS not in raw_metadata and {k: v for k, v in metadata.items() if k != KEY_NMS} == raw_metadata


def test_an_int8_graph_ends_in_the_same_detections_as_its_raw_form(
    flavors: dict[str, Path], images: np.ndarray, tmp_path: Path
) -> None:
    for flavor, raw in flavors.items():
        end_to_end = write_end_to_end(raw, tmp_path / f"e2e.{flavor}.onnx", VAL_NMS)
        with OnnxRuntimeBackend(raw) as backend:
            want = postprocess(*backend.run(images), VAL_NMS)
        _assert_same(_end_to_end_detections(end_to_end, images), want)


def test_an_end_to_end_graph_runs_at_its_built_in_settings_and_refuses_others(
    raw_and_end_to_end: tuple[Path, Path],
) -> None:
    # (Its mAP equals the raw graph's at the same settings: tests/test_cli.py, the acceptance check.)
    from nasquant.eval.postprocess import resolve_nms

    raw, end_to_end = raw_and_end_to_end
    with OnnxRuntimeBackend(end_to_end) as backend:
        assert resolve_nms(backend, VAL_NMS) == PREDICT_NMS  # its own, not validation's conf 0.01
        assert resolve_nms(backend, VAL_NMS, conf=PREDICT_NMS.conf, top_k=None) == PREDICT_NMS
        with pytest.raises(NasquantError, match=r"NMS built in \(conf=0.25, iou=0.7.*cannot apply conf=0.01"):
            resolve_nms(backend, VAL_NMS, conf=0.01)
    with OnnxRuntimeBackend(raw) as backend:  # a raw graph takes any settings
        assert resolve_nms(backend, VAL_NMS, iou=0.5) == replace(VAL_NMS, iou=0.5)
    NAS(end_to_end).predict(np.zeros((64, 64, 3), np.uint8), conf=PREDICT_NMS.conf)
    with pytest.raises(NasquantError, match="cannot apply conf=0.01"):
        NAS(end_to_end).val(shared_path(*SHAPES_VAL), conf=0.01, progress=False)


def test_nms_is_appended_to_raw_graphs_only(raw_and_end_to_end: tuple[Path, Path]) -> None:
    raw, end_to_end = raw_and_end_to_end
    with pytest.raises(NasquantError, match="raw graph"):
        append_nms(onnx.load(str(end_to_end)), PREDICT_NMS)


def test_export_writes_an_end_to_end_graph_in_one_call(shapes_nas: NAS, tmp_path: Path) -> None:
    path = shapes_nas.export(tmp_path / "m.onnx", nms=True)
    assert read_metadata(path)[KEY_NMS] == json.dumps(asdict(PREDICT_NMS))
    with OnnxRuntimeBackend(path) as backend:
        assert backend.end_to_end and backend.batch_size == 1
    assert torch.is_grad_enabled()  # the export leaves torch's global state alone
