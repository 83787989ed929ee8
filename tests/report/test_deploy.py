"""DEPLOY.md text for the two preprocessing protocols and both batch kinds, the timing lines, and the
TensorRT version notes (weak typing, DLA, JetPack 5)."""

from __future__ import annotations

from pathlib import Path

from nasquant.data.preprocess import Preprocess
from nasquant.export.engine_plan import EngineSettings, Profile
from nasquant.report.deploy import render_deploy_guide
from nasquant.settings import NMSSettings
from tests.export.test_tensorrt import TRTEXEC_8_5_OPTIONS, trtexec_options

DYNAMIC = Profile("images", (1, 3, 640, 640), (4, 3, 640, 640), (8, 3, 640, 640))


def _guide(settings: EngineSettings, spec: Preprocess, **extra) -> str:
    return render_deploy_guide(
        fp32_onnx=Path("model.fp32.onnx"),
        int8_onnx=Path("model.int8.trt.onnx"),
        settings=settings,
        spec=spec,
        nms=NMSSettings(conf=0.25, iou=0.6, top_k=500, max_det=100, multi_label=False),
        class_names=["person", "car"],
        skipped_layers=["heads.head1.reg_pred"],
        **extra,
    )


def _section(guide: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    body = guide.split(f"\n{heading}\n", 1)[1]
    ends = [body.find(f"\n{'#' * n} ") for n in range(1, len(level) + 1)]
    return body[: min((e for e in ends if e >= 0), default=len(body))]


def _trtexec_lines(text: str) -> list[dict[str, str | None]]:
    return [
        trtexec_options(line.strip()) for line in text.splitlines() if line.strip().startswith("trtexec ")
    ]


def test_a_dynamic_batch_letterbox_guide() -> None:
    guide = _guide(EngineSettings("int8", DYNAMIC), Preprocess.from_protocol("letterbox", 640))
    assert "N x 3 x 640 x 640 (dynamic batch, min/opt/max 1/4/8)" in guide
    assert "`round(h * scale) x round(w * scale)`" in guide  # Ultralytics' rounding
    assert "--maxShapes=images:8x3x640x640" in guide
    assert "(best class per anchor only)" in guide and "keep the 500 highest" in guide
    assert "N x A x 2, per-class probabilities" in guide and "0: person, 1: car" in guide
    assert "`heads.head1.reg_pred`" in guide


def test_a_fixed_batch_super_gradients_guide() -> None:
    guide = _guide(EngineSettings("int8"), Preprocess.from_protocol("sg", 640), fixed_batch=1)
    assert "N x 3 x 640 x 640 (fixed batch N = 1)" in guide
    assert "longer side is 636 px" in guide and "(rounded down)" in guide
    assert "Shapes=" not in guide and "--shapes=" not in guide  # a fixed batch has one shape
    # the timing line loads the engine the build line above writes
    timing = _trtexec_lines(_section(guide, "## Timing an engine with `trtexec`"))
    assert timing[0]["--loadEngine"] == "model.int8.engine" and "--shapes" not in timing[0]


def test_the_guide_times_each_engine_it_builds_and_says_what_to_read() -> None:
    guide = _guide(EngineSettings("int8", DYNAMIC), Preprocess.from_protocol("letterbox", 640))
    built = {line["--saveEngine"] for line in _trtexec_lines(guide) if "--saveEngine" in line}
    timing = _trtexec_lines(_section(guide, "## Timing an engine with `trtexec`"))
    assert [line["--loadEngine"] for line in timing] == [
        "model.int8.engine",
        "model.fp16.engine",
        "model.int8.dla0.engine",
    ]
    assert {line["--loadEngine"] for line in timing} <= built
    for line in timing:  # the batch the build lines' --optShapes tuned the engine for
        assert line["--shapes"] == "images:4x3x640x640" and "--noDataTransfers" in line
    assert "--useDLACore" not in timing[0] and timing[2]["--useDLACore"] == "0"
    assert "`GPU Compute Time: ... median = X ms`" in guide
    assert "none of the pre-processing" in guide and "post-processing (candidates, NMS" in guide


def test_the_guide_notes_the_weak_typing_deprecation_and_the_strong_alternative() -> None:
    guide = _guide(EngineSettings("int8", DYNAMIC), Preprocess.from_protocol("letterbox", 640))
    assert "TensorRT 10.12 deprecated weak typing" in guide
    assert (
        "`trtexec` 10.14 and newer prints `Weakly-typed networks\nhave been deprecated in TensorRT`" in guide
    )
    assert "warning only: the\nengine builds" in guide and "TensorRT 11 removes weak typing" in guide
    assert "`engines.typing: strong`" in guide and "`--typing strong`" in guide
    # the strongly typed TensorRT 10 build: the AutoCast graph, --stronglyTyped, no precision flags
    strong = [line for line in _trtexec_lines(guide) if "--stronglyTyped" in line]
    assert len(strong) == 1 and strong[0]["--onnx"] == "model.int8.trt.fp16.onnx"
    assert not {"--int8", "--fp16"} & strong[0].keys()


def test_the_dla_section_offers_tensorrt_10_only() -> None:
    guide = _guide(EngineSettings("int8", DYNAMIC), Preprocess.from_protocol("letterbox", 640))
    dla = _section(guide, "### DLA (TensorRT 10.x only)")
    assert "need the TensorRT 10.x that JetPack 6\nships" in dla
    assert "no DLA in TensorRT 11.0 to 11.3" in dla and "nasquant refuses `engines.dla_core`" in dla
    (build,) = _trtexec_lines(dla)
    # a weakly typed (TensorRT 10) build of the QDQ graph itself, not TensorRT 11's AutoCast graph
    assert build["--useDLACore"] == "0" and "--allowGPUFallback" in build
    assert "--int8" in build and build["--onnx"] == "model.int8.trt.onnx"
    # and no other DLA build anywhere in the guide
    assert [line for line in _trtexec_lines(guide) if "--useDLACore" in line and "--onnx" in line] == [build]
    assert "## Jetson Orin (JetPack 6.1+, TensorRT 10.3)" in guide


def test_the_jetpack_5_section_gives_the_reason_and_what_works() -> None:
    guide = _guide(EngineSettings("int8", DYNAMIC), Preprocess.from_protocol("letterbox", 640))
    jetpack5 = _section(guide, "## JetPack 5 / Xavier (TensorRT 8.5): not supported, and what works instead")
    assert "EXPLICIT_BATCH" in jetpack5 and "IProgressMonitor" in jetpack5
    assert "`--skipInference` and `--builderOptimizationLevel`" in jetpack5
    (fp16,) = _trtexec_lines(jetpack5)
    assert fp16.keys() <= TRTEXEC_8_5_OPTIONS
    assert (fp16["--onnx"], fp16["--saveEngine"], fp16["--optShapes"]) == (
        "model.fp32.onnx",
        "model.fp16.engine",
        "images:4x3x640x640",
    )
    assert "Not tested by nasquant" in jetpack5 and "is not tested" in jetpack5  # the INT8 graph on 8.5
    assert "`*.int8.cpu.onnx`" in jetpack5


def test_the_end_to_end_section_names_the_files_settings_and_outputs() -> None:
    files = [Path("model.fp32-nms.onnx"), Path("model.int8-nms.trt.onnx")]
    nms = NMSSettings(conf=0.3, iou=0.5, top_k=800, max_det=50)
    section = _section(
        _guide(
            EngineSettings("int8", DYNAMIC),
            Preprocess.from_protocol("sg", 640),
            end_to_end=files,
            end_to_end_nms=nms,
        ),
        "## End-to-end graphs (NMS inside)",
    )
    assert "`model.fp32-nms.onnx`, `model.int8-nms.trt.onnx` end in detections" in section
    assert "conf 0.3, IoU 0.5, top-k 800" in section and "at most 50 detections" in section
    for output in (
        "`num_dets`: int32, N x 1",
        "`det_boxes`: float32, N x 50 x 4",
        "`det_classes`: int32, N x 50, class ids 0..1",
    ):
        assert output in section, output
    assert "INMSLayer" in section
    without = _section(
        _guide(EngineSettings("int8", DYNAMIC), Preprocess.from_protocol("sg", 640)),
        "## End-to-end graphs (NMS inside)",
    )
    assert "export.nms: true" in without and "nasquant export --nms" in without and "N x K x 4" in without
