"""TensorRT build settings without a GPU: recipe -> settings -> builder plan -> trtexec flags, the ONNX
checks before a build, and ModelOpt AutoCast (which runs on the CPU). The builder itself runs in
tests/runtime/test_tensorrt_backend.py on a TensorRT machine."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from nasquant import NAS
from nasquant.artifacts import KEY_NAMES, autocast_path, engine_path, read_metadata
from nasquant.cuda import tensorrt_unavailable
from nasquant.data.preprocess import preprocess, read_image
from nasquant.errors import NasquantError
from nasquant.export import count_qdq
from nasquant.export.engine_plan import (
    EngineSettings,
    EngineSource,
    Profile,
    autocast_command,
    build_plan,
    engine_settings,
    optimization_profile,
    trtexec_command,
    trtexec_fp16_fallback_command,
    trtexec_timing_command,
)
from nasquant.export.tensorrt import autocast_fp16
from nasquant.recipe import EnginesSection, load_recipe
from nasquant.runtime import OnnxRuntimeBackend
from tests.conftest import IMGSZ
from tests.shared import shared_path

# Every option nasquant writes, as trtexec's --help spells it (TensorRT 10 / 11 documentation).
TRTEXEC_OPTIONS = {
    "--onnx",
    "--saveEngine",
    "--skipInference",
    "--stronglyTyped",
    "--fp16",
    "--int8",
    "--minShapes",
    "--optShapes",
    "--maxShapes",
    "--memPoolSize",
    "--builderOptimizationLevel",
    "--hardwareCompatibilityLevel",
    "--useDLACore",
    "--allowGPUFallback",
    "--timingCacheFile",
    "--exportLayerInfo",
    "--profilingVerbosity",
    "--verbose",
    "--loadEngine",
    "--shapes",
    "--warmUp",
    "--duration",
    "--useCudaGraph",
    "--noDataTransfers",
    "--useSpinWait",
}
# The build and inference options TensorRT 8.5's trtexec has (JetPack 5; from its --help text).
TRTEXEC_8_5_OPTIONS = {
    "--onnx",
    "--saveEngine",
    "--fp16",
    "--int8",
    "--minShapes",
    "--optShapes",
    "--maxShapes",
    "--loadEngine",
    "--shapes",
    "--warmUp",
    "--duration",
    "--useDLACore",
    "--useCudaGraph",
    "--noDataTransfers",
    "--useSpinWait",
}


def trtexec_options(command: str) -> dict[str, str | None]:
    words = shlex.split(command)
    assert words[0] == "trtexec"
    options = {}
    for word in words[1:]:
        name, _, value = word.partition("=")
        assert name in TRTEXEC_OPTIONS, f"unknown trtexec option {name}"
        options[name] = value or None
    return options


# --- optimization profile ---------------------------------------------------------------------


def test_a_static_graph_has_no_profile_and_refuses_a_batch_range() -> None:
    assert optimization_profile(imgsz=640, batch=1, dynamic_batch=False) is None
    assert optimization_profile(imgsz=640, batch=4, dynamic_batch=False, max_batch=4) is None
    with pytest.raises(NasquantError, match=r"engines.max_batch=8.*fixed batch of 1.*dynamic_batch"):
        optimization_profile(imgsz=640, batch=1, dynamic_batch=False, max_batch=8)


@pytest.mark.parametrize(
    ("batch", "bounds", "expected"),
    [
        (1, (None, None, None), (1, 1, 1)),
        (4, (None, None, None), (4, 4, 4)),
        (1, (1, None, 16), (1, 1, 16)),
        (8, (1, None, 16), (1, 8, 16)),
        (32, (1, None, 16), (1, 16, 16)),  # the optimum is clamped into the range
        (1, (2, 4, 8), (2, 4, 8)),
        (1, (None, None, 8), (1, 1, 8)),
    ],
)
def test_a_dynamic_graph_gets_the_batch_range_asked_for(
    batch: int, bounds: tuple, expected: tuple[int, int, int]
) -> None:
    low, best, high = bounds
    profile = optimization_profile(
        imgsz=320, batch=batch, dynamic_batch=True, min_batch=low, opt_batch=best, max_batch=high
    )
    assert profile == Profile("images", *((b, 3, 320, 320) for b in expected))


def test_an_optimum_outside_the_range_is_refused() -> None:
    with pytest.raises(NasquantError, match="min_batch <= opt_batch <= max_batch, got 2 / 16 / 8"):
        optimization_profile(imgsz=320, batch=1, dynamic_batch=True, min_batch=2, opt_batch=16, max_batch=8)


def test_engine_settings_come_from_the_recipe(tmp_path: Path) -> None:
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        "model: {checkpoint: s.pt, variant: yolo_nas_s}\n"
        "engines: {workspace_mb: 2048, optimization_level: 5, min_batch: 1, max_batch: 8,\n"
        "          timing_cache: cache/t4.cache, typing: weak, hardware_compatibility: ampere_plus}\n"
    )
    section = load_recipe(recipe_file).engines
    settings = engine_settings(section, precision="int8", imgsz=640, batch=4, dynamic_batch=True)
    assert settings == EngineSettings(
        "int8", Profile("images", (1, 3, 640, 640), (4, 3, 640, 640), (8, 3, 640, 640)), section
    )
    assert (section.workspace_mb, section.optimization_level, section.typing) == (2048, 5, "weak")
    # recipe paths resolve against the recipe's folder
    assert settings.timing_cache == tmp_path / "cache" / "t4.cache"


# --- builder plan -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "flags"), [("fp32", ()), ("fp16", ("FP16",)), ("int8", ("INT8", "FP16"))]
)
def test_tensorrt_10_builds_weakly_typed_with_precision_flags(precision: str, flags: tuple) -> None:
    plan = build_plan(EngineSettings(precision), tensorrt_version="10.3.0")
    assert (plan.strongly_typed, plan.autocast_fp16, plan.builder_flags) == (False, False, flags)
    assert plan.workspace_bytes == 4096 << 20 and plan.optimization_level == 3


@pytest.mark.parametrize(("precision", "autocast"), [("fp32", False), ("fp16", True), ("int8", True)])
def test_tensorrt_11_builds_strongly_typed_from_an_autocast_graph(precision: str, autocast: bool) -> None:
    plan = build_plan(EngineSettings(precision), tensorrt_version="11.4.1")
    assert (plan.strongly_typed, plan.autocast_fp16, plan.builder_flags) == (True, autocast, ())
    # strong typing is also available on 10 when asked for
    assert build_plan(
        EngineSettings(precision, engines=EnginesSection(typing="strong")), tensorrt_version="10.8.0"
    ).strongly_typed


def test_versions_and_settings_that_cannot_build_are_refused_in_one_line() -> None:
    with pytest.raises(NasquantError, match=r"TensorRT 8.6.1 is too old.*10 or newer"):
        build_plan(EngineSettings("int8"), tensorrt_version="8.6.1")
    with pytest.raises(NasquantError, match="typing: weak needs TensorRT 10"):
        build_plan(EngineSettings("fp16", engines=EnginesSection(typing="weak")), tensorrt_version="11.0.0")
    with pytest.raises(NasquantError, match="DLA runs FP16 or INT8"):
        build_plan(EngineSettings("fp32", engines=EnginesSection(dla_core=0)), tensorrt_version="10.3.0")
    with pytest.raises(NasquantError, match="DLA engines cannot be hardware-compatible"):
        build_plan(
            EngineSettings("int8", engines=EnginesSection(dla_core=0, hardware_compatibility="ampere_plus")),
            tensorrt_version="10.3",
        )
    with pytest.raises(NasquantError, match="major version"):
        build_plan(EngineSettings("fp16"), tensorrt_version="latest")


def test_jetpack_5_is_refused_with_the_reason_and_what_works_instead() -> None:
    with pytest.raises(NasquantError) as refused:
        build_plan(EngineSettings("int8"), tensorrt_version="8.5.2")
    message = str(refused.value)
    assert "\n" not in message and message.startswith("TensorRT 8.5.2 is too old")
    # the reason: what nasquant's builder uses that TensorRT 8 lacks
    assert "EXPLICIT_BATCH" in message and "IProgressMonitor" in message
    # the alternatives: TensorRT 10 on an Orin, the FP32 graph with plain trtexec, the CPU flavour
    assert "JetPack 6.1+ (TensorRT 10.3)" in message
    assert "`trtexec --onnx=<model>.fp32.onnx --fp16`" in message and "*.int8.cpu.onnx" in message


@pytest.mark.parametrize("version", ["11", "11.0.0", "11.1", "11.3.1", "11.4", "11.4.0.7"])
def test_dla_is_refused_with_the_tensorrt_11_releases_that_have_none(version: str) -> None:
    settings = EngineSettings("int8", engines=EnginesSection(dla_core=0))
    with pytest.raises(NasquantError, match=rf"dla_core: TensorRT {version} has no DLA.*TensorRT 10\.x"):
        build_plan(settings, tensorrt_version=version)
    with pytest.raises(NasquantError, match="has no DLA"):
        trtexec_command("model.int8.trt.onnx", "model.int8.dla0.engine", settings, tensorrt_version=version)


@pytest.mark.parametrize("version", ["10.3.0", "10.3.0.30", "11.4.1", "11.5"])
def test_dla_builds_where_nvidia_documents_it(version: str) -> None:
    plan = build_plan(EngineSettings("int8", engines=EnginesSection(dla_core=0)), tensorrt_version=version)
    assert plan.dla_core == 0 and "GPU_FALLBACK" in plan.builder_flags
    # TensorRT 11.4.1 brings DLA back strongly typed, from the AutoCast graph
    assert plan.strongly_typed == plan.autocast_fp16 == version.startswith("11")


def test_dla_hardware_compatibility_and_cache_settings_reach_the_plan(tmp_path: Path) -> None:
    dla = build_plan(EngineSettings("int8", engines=EnginesSection(dla_core=1)), tensorrt_version="10.3.0")
    assert dla.dla_core == 1 and dla.builder_flags == ("INT8", "FP16", "GPU_FALLBACK")
    strict = build_plan(
        EngineSettings("int8", engines=EnginesSection(dla_core=1, gpu_fallback=False)),
        tensorrt_version="10.3.0",
    )
    assert "GPU_FALLBACK" not in strict.builder_flags
    portable = build_plan(
        EngineSettings(
            "fp16",
            engines=EnginesSection(
                hardware_compatibility="same_compute_capability", timing_cache=str(tmp_path / "c")
            ),
        ),
        tensorrt_version="10.8.0",
    )
    # names of tensorrt.HardwareCompatibilityLevel members, looked up with getattr by the builder
    assert (
        portable.hardware_compatibility == "SAME_COMPUTE_CAPABILITY"
        and portable.timing_cache == tmp_path / "c"
    )
    assert build_plan(EngineSettings("fp16"), tensorrt_version="10.8.0").hardware_compatibility is None


# --- trtexec hand-off -------------------------------------------------------------------------


def test_trtexec_line_for_an_int8_graph_on_tensorrt_10(flavors: dict[str, Path]) -> None:
    onnx_path = flavors["trt"]
    engine = engine_path(onnx_path, "int8")
    profile = EngineSource.inspect(onnx_path).profile(1, 2, 4)
    command = trtexec_command(onnx_path, engine, EngineSettings("int8", profile), tensorrt_version="10.3")
    options = trtexec_options(command)
    assert options["--onnx"] == str(onnx_path) and Path(options["--onnx"]).is_file()
    assert options["--saveEngine"] == str(engine) and engine.name == "model.int8.engine"
    assert "--int8" in options and "--fp16" in options and "--stronglyTyped" not in options
    assert (options["--minShapes"], options["--optShapes"], options["--maxShapes"]) == (
        f"images:1x3x{IMGSZ}x{IMGSZ}",
        f"images:2x3x{IMGSZ}x{IMGSZ}",
        f"images:4x3x{IMGSZ}x{IMGSZ}",
    )
    assert options["--memPoolSize"] == "workspace:4096M" and options["--builderOptimizationLevel"] == "3"
    assert options["--exportLayerInfo"] == str(engine.with_suffix(".layers.json"))


def test_trtexec_lines_for_jetson_dla_and_tensorrt_11(tmp_path: Path) -> None:
    onnx_path = tmp_path / "my models" / "model.int8.trt.onnx"  # a space: the line must quote it
    engine = tmp_path / "model.int8.dla0.engine"
    dla = trtexec_command(
        onnx_path,
        engine,
        EngineSettings(
            "int8", engines=EnginesSection(dla_core=0, timing_cache=str(tmp_path / "t.cache"), verbose=True)
        ),
        tensorrt_version="10.3.0",
    )
    options = trtexec_options(dla)
    assert options["--onnx"] == str(onnx_path)
    assert options["--useDLACore"] == "0" and "--allowGPUFallback" in options and "--verbose" in options
    assert options["--timingCacheFile"] == str(tmp_path / "t.cache")

    strong = trtexec_options(
        trtexec_command(onnx_path, engine, EngineSettings("int8"), tensorrt_version="11.1")
    )
    # TensorRT 11: no precision flags (removed), no --stronglyTyped (always on), the AutoCast graph
    assert not {"--int8", "--fp16", "--stronglyTyped"} & strong.keys()
    assert (
        strong["--onnx"]
        == str(autocast_path(onnx_path))
        == str(onnx_path.parent / "model.int8.trt.fp16.onnx")
    )
    opted_in = trtexec_options(
        trtexec_command(onnx_path, engine, EngineSettings("fp16", engines=EnginesSection(typing="strong")))
    )
    assert "--stronglyTyped" in opted_in and "--fp16" not in opted_in
    compatible = trtexec_options(
        trtexec_command(
            onnx_path,
            engine,
            EngineSettings("fp16", engines=EnginesSection(hardware_compatibility="ampere_plus")),
        )
    )
    assert compatible["--hardwareCompatibilityLevel"] == "ampere+"
    assert shlex.split(autocast_command(onnx_path))[:3] == ["python", "-m", "modelopt.onnx.autocast"]


def test_trtexec_times_an_engine_at_the_batch_it_was_built_for() -> None:
    profile = Profile("images", (1, 3, 640, 640), (4, 3, 640, 640), (8, 3, 640, 640))
    command = trtexec_timing_command(Path("runs/a/model.int8.engine"), EngineSettings("int8", profile))
    options = trtexec_options(command)
    assert options == {
        "--loadEngine": "runs/a/model.int8.engine",
        "--shapes": "images:4x3x640x640",  # the profile's optimum
        "--warmUp": "1000",  # milliseconds
        "--duration": "10",  # seconds
        "--useCudaGraph": None,
        "--noDataTransfers": None,  # GPU compute only: no host<->device copies
        "--useSpinWait": None,
    }
    assert options.keys() <= TRTEXEC_8_5_OPTIONS  # the same line times a JetPack 5 engine
    # a fixed-batch engine has one shape; a DLA engine is loaded onto the core it was built for
    static = trtexec_options(trtexec_timing_command("model.int8.engine", EngineSettings("int8")))
    assert "--shapes" not in static and "--useDLACore" not in static
    dla = EngineSettings("int8", profile, EnginesSection(dla_core=1))
    assert trtexec_options(trtexec_timing_command("model.int8.dla1.engine", dla))["--useDLACore"] == "1"


def test_the_jetpack_5_fp16_line_uses_only_tensorrt_8_5_options() -> None:
    profile = Profile("images", (1, 3, 320, 320), (2, 3, 320, 320), (4, 3, 320, 320))
    options = trtexec_options(trtexec_fp16_fallback_command("model.fp32.onnx", "model.fp16.engine", profile))
    assert options.keys() <= TRTEXEC_8_5_OPTIONS
    assert (options["--onnx"], options["--saveEngine"], options["--maxShapes"]) == (
        "model.fp32.onnx",
        "model.fp16.engine",
        "images:4x3x320x320",
    )
    assert "--fp16" in options and "--int8" not in options
    static = trtexec_options(trtexec_fp16_fallback_command("model.fp32.onnx", "model.fp16.engine", None))
    assert not {"--minShapes", "--optShapes", "--maxShapes"} & static.keys()


@pytest.mark.parametrize(
    ("name", "precision", "engine"),
    [
        ("model.fp32.onnx", "fp16", "model.fp16.engine"),
        ("model.fp32.onnx", "fp32", "model.fp32.engine"),
        ("model.int8.trt.onnx", "int8", "model.int8.engine"),
        ("model.int8-all.trt.onnx", "int8", "model.int8-all.engine"),
        ("yolo_nas_s.onnx", "fp16", "yolo_nas_s.fp16.engine"),
    ],
)
def test_default_engine_names(name: str, precision: str, engine: str) -> None:
    assert engine_path(Path("runs/a") / name, precision) == Path("runs/a") / engine


# --- what an engine is built from ------------------------------------------------------------


def test_engine_sources_are_checked_before_a_build(flavors: dict[str, Path], fp32_onnx: Path) -> None:
    fp32, int8 = EngineSource.inspect(fp32_onnx), EngineSource.inspect(flavors["trt"])
    assert (fp32.imgsz, fp32.batch, fp32.precision) == (IMGSZ, 1, "fp32")
    assert (int8.imgsz, int8.batch, int8.precision) == (IMGSZ, None, "int8")
    assert fp32.profile() is None and int8.profile().max == (1, 3, IMGSZ, IMGSZ)
    fp32.check_precision("fp16")
    int8.check_precision("int8")
    with pytest.raises(NasquantError, match="no Q/DQ nodes: INT8 engines are built from the quantized"):
        fp32.check_precision("int8")
    with pytest.raises(NasquantError, match="INT8 QDQ graph: build it with precision int8"):
        int8.check_precision("fp16")
    with pytest.raises(NasquantError, match="CPU flavour.*build TensorRT engines from the \\*.int8.trt.onnx"):
        EngineSource.inspect(flavors["cpu"])


def test_the_reason_tensorrt_cannot_run_here() -> None:
    # What the pipeline's skipped TensorRT rows say (CI has neither TensorRT nor a GPU).
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert tensorrt_unavailable() == "tensorrt not installed"
    else:
        assert tensorrt_unavailable() in (None, "cuda-python not installed", "no CUDA device")


# --- ModelOpt AutoCast on the CPU -------------------------------------------------------------


def test_autocast_writes_an_fp16_graph_with_float32_io_and_the_same_detections(
    fp32_onnx: Path, shapes_nas: NAS, tmp_path: Path
) -> None:
    target = autocast_fp16(fp32_onnx, tmp_path / "model.fp32.fp16.onnx")
    model = onnx.load(str(target))
    assert [i.type.tensor_type.elem_type for i in (*model.graph.input, *model.graph.output)] == [
        TensorProto.FLOAT
    ] * 3
    assert sum(init.data_type == TensorProto.FLOAT16 for init in model.graph.initializer) > 100
    assert read_metadata(target)[KEY_NAMES] == read_metadata(fp32_onnx)[KEY_NAMES]  # metadata kept
    paths = sorted(shared_path("data", "shapes", "val", "images").glob("*.jpg"))[:2]
    images = np.stack([preprocess(read_image(p), shapes_nas.preprocessing())[0] for p in paths])
    reference, converted = OnnxRuntimeBackend(fp32_onnx), OnnxRuntimeBackend(target)  # fixed batch 1
    want = [
        np.concatenate(parts) for parts in zip(*(reference.run(image[None]) for image in images), strict=True)
    ]
    got = [
        np.concatenate(parts) for parts in zip(*(converted.run(image[None]) for image in images), strict=True)
    ]
    confident = want[1].max(axis=2) > 0.5
    assert confident.any()
    assert np.abs(got[0][confident] - want[0][confident]).max() < 1.0  # pixels
    assert np.abs(got[1] - want[1]).max() < 0.02


def test_autocast_keeps_every_qdq_node_of_an_int8_graph(flavors: dict[str, Path], tmp_path: Path) -> None:
    target = autocast_fp16(flavors["trt"], tmp_path / "model.int8.trt.fp16.onnx")
    before, after = count_qdq(onnx.load(str(flavors["trt"]))), count_qdq(onnx.load(str(target)))
    assert after == before
