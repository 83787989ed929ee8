"""What a TensorRT build is told, as plain data: engine settings from the recipe, the optimization
profile, the :class:`BuildPlan` (typing, builder flags, pools, DLA, hardware compatibility), the same
plan spelled as ``trtexec`` and ModelOpt AutoCast command lines, and the ``trtexec`` line that times
the built engine.

Nothing here imports ``tensorrt``: the mapping from a recipe to a build is tested without a GPU, and
DEPLOY.md is written from it. :mod:`nasquant.export.tensorrt` applies a plan through the TensorRT API.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nasquant.artifacts import (
    INPUT_NAME,
    autocast_path,
)
from nasquant.errors import NasquantError
from nasquant.recipe import EnginesSection
from nasquant.settings import Precision

#: oldest TensorRT nasquant builds with: its builder parses the ONNX into a network created without the
#: EXPLICIT_BATCH flag (TensorRT 8's ONNX parser refuses such a network; TensorRT 10 has explicit batch
#: only) and follows the build through IProgressMonitor (not in TensorRT 8's API)
MIN_TENSORRT_MAJOR = 10
#: first TensorRT major without weak typing (no precision builder flags)
STRONG_ONLY_MAJOR = 11
#: first TensorRT 11 release with DLA on a Jetson (AGX Orin, JetPack 7.2.2+); NVIDIA's "Working with DLA":
#: 11.0 to 11.3 have no DLA, 11.4.0 only on Windows on ARM
FIRST_TENSORRT_11_DLA = (11, 4, 1)
#: the timing line's warm-up (milliseconds) and measured wall time (seconds); trtexec's own are 200 ms, 3 s
TIMING_WARMUP_MS = 1000
TIMING_DURATION_S = 10

_HARDWARE_LEVELS = {"ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}
_TRTEXEC_HARDWARE = {"ampere_plus": "ampere+", "same_compute_capability": "sameComputeCapability"}


@dataclass(frozen=True)
class Profile:
    """The optimization profile of a dynamic-batch engine: input shapes it accepts and is tuned for."""

    input_name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input_name, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def optimization_profile(
    *,
    imgsz: int,
    batch: int,
    dynamic_batch: bool,
    min_batch: int | None = None,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    input_name: str = INPUT_NAME,
) -> Profile | None:
    """The profile for a graph exported at ``imgsz`` (None for a static-batch graph: nothing to choose).

    Unset bounds default to the recipe's ``input.batch``; the optimum defaults to it as well, clamped
    into ``[min, max]``.
    """
    given = {"min_batch": min_batch, "opt_batch": opt_batch, "max_batch": max_batch}
    if not dynamic_batch:
        ranged = {name: value for name, value in given.items() if value not in (None, batch)}
        if ranged:
            names = ", ".join(f"engines.{name}={value}" for name, value in ranged.items())
            raise NasquantError(
                f"{names}: the ONNX graph has a fixed batch of {batch}; "
                "set export.dynamic_batch: true to build an engine for a batch range"
            )
        return None
    low = min_batch if min_batch is not None else min(batch, max_batch or batch)
    high = max_batch if max_batch is not None else max(batch, low)
    best = opt_batch if opt_batch is not None else min(max(batch, low), high)
    if not low <= best <= high:
        raise NasquantError(f"engines: need min_batch <= opt_batch <= max_batch, got {low} / {best} / {high}")
    shape = (3, imgsz, imgsz)
    return Profile(input_name, (low, *shape), (best, *shape), (high, *shape))


@dataclass(frozen=True)
class EngineSettings:
    """One engine to build: its precision, the batch profile of the ONNX it comes from, and every
    builder option as the recipe's ``engines`` section holds it (defaults written there once; the
    CLI fills a section from its flags)."""

    precision: Precision
    profile: Profile | None = None
    engines: EnginesSection = field(default_factory=EnginesSection)

    @property
    def timing_cache(self) -> Path | None:
        return Path(self.engines.timing_cache) if self.engines.timing_cache else None


def engine_settings(
    engines: EnginesSection, *, precision: Precision, imgsz: int, batch: int, dynamic_batch: bool
) -> EngineSettings:
    """The settings for one engine from a recipe's ``engines`` section and its ONNX's batch kind."""
    profile = optimization_profile(
        imgsz=imgsz,
        batch=batch,
        dynamic_batch=dynamic_batch,
        min_batch=engines.min_batch,
        opt_batch=engines.opt_batch,
        max_batch=engines.max_batch,
    )
    return EngineSettings(precision, profile, engines)


@dataclass(frozen=True)
class EngineSource:
    """What a builder needs to know about an ONNX file before building from it."""

    path: Path
    imgsz: int
    batch: int | None
    """The graph's fixed batch, or None for a dynamic-batch graph."""
    precision: str
    """The graph's own precision (``fp32`` or ``int8``), from nasquant's metadata or its Q/DQ nodes."""

    @classmethod
    def inspect(cls, onnx_path: str | os.PathLike) -> EngineSource:
        from nasquant.artifacts import KEY_FLAVOR, KEY_PRECISION
        from nasquant.export.onnx_files import load_onnx

        path = Path(onnx_path)
        model = load_onnx(path)
        metadata = {prop.key: prop.value for prop in model.metadata_props}
        if metadata.get(KEY_FLAVOR) == "cpu":
            raise NasquantError(
                f"{path} is the ONNX Runtime CPU flavour (uint8 activations); "
                "build TensorRT engines from the *.int8.trt.onnx graph"
            )
        inputs = [i for i in model.graph.input if i.name == INPUT_NAME]
        if not inputs:
            raise NasquantError(f"{path}: no {INPUT_NAME!r} input (not a nasquant export)")
        dims = inputs[0].type.tensor_type.shape.dim
        if len(dims) != 4 or not (dims[2].HasField("dim_value") and dims[3].HasField("dim_value")):
            raise NasquantError(f"{path}: {INPUT_NAME!r} must be N x 3 x H x W with a static H and W")
        quantized = any(node.op_type == "QuantizeLinear" for node in model.graph.node)
        precision = metadata.get(KEY_PRECISION) or ("int8" if quantized else "fp32")
        batch = dims[0].dim_value if dims[0].HasField("dim_value") else None
        return cls(path, int(dims[2].dim_value), batch, precision)

    def check_precision(self, precision: Precision) -> None:
        """An INT8 engine needs the QDQ graph (explicit quantization); a float one the float graph."""
        if precision == "int8" and self.precision != "int8":
            raise NasquantError(
                f"{self.path} has no Q/DQ nodes: INT8 engines are built from the quantized *.int8.trt.onnx "
                "graph (TensorRT has no implicit calibration any more)"
            )
        if precision != "int8" and self.precision == "int8":
            raise NasquantError(f"{self.path} is an INT8 QDQ graph: build it with precision int8")

    def profile(
        self, min_batch: int | None = None, opt_batch: int | None = None, max_batch: int | None = None
    ) -> Profile | None:
        return optimization_profile(
            imgsz=self.imgsz,
            batch=self.batch or 1,
            dynamic_batch=self.batch is None,
            min_batch=min_batch,
            opt_batch=opt_batch,
            max_batch=max_batch,
        )


@dataclass(frozen=True)
class BuildPlan:
    """What the builder is told, as plain data: :func:`build_engine` applies it through the TensorRT
    API and :func:`trtexec_command` spells it as flags. Names are TensorRT enum member names."""

    tensorrt_major: int
    strongly_typed: bool
    builder_flags: tuple[str, ...]
    workspace_bytes: int
    optimization_level: int
    hardware_compatibility: str | None
    dla_core: int | None
    profile: Profile | None
    timing_cache: Path | None
    autocast_fp16: bool
    """Convert the ONNX to FP16 with ModelOpt AutoCast first (strong typing with FP16 / INT8)."""
    precision: Precision
    verbose: bool


def build_plan(settings: EngineSettings, *, tensorrt_version: str) -> BuildPlan:
    """Check ``settings`` against a TensorRT version and decide every builder setting."""
    version = _version(tensorrt_version)
    major = version[0]
    if major < MIN_TENSORRT_MAJOR:
        raise NasquantError(
            f"TensorRT {tensorrt_version} is too old: nasquant builds with TensorRT {MIN_TENSORRT_MAJOR} or newer "
            "(its builder creates the network without the EXPLICIT_BATCH flag, which TensorRT 8's ONNX parser "
            "refuses, and uses IProgressMonitor; its trtexec lines are written for TensorRT 10's trtexec); "
            "on a Jetson Orin use JetPack 6.1+ (TensorRT 10.3); on JetPack 5 / Xavier build an FP16 engine "
            "from the FP32 ONNX with `trtexec --onnx=<model>.fp32.onnx --fp16` or run the *.int8.cpu.onnx "
            "graph on ONNX Runtime (DEPLOY.md, JetPack 5 section)"
        )
    typing = settings.engines.typing
    if typing == "auto":
        typing = "strong" if major >= STRONG_ONLY_MAJOR else "weak"
    if typing == "weak" and major >= STRONG_ONLY_MAJOR:
        raise NasquantError(
            f"engines.typing: weak needs TensorRT 10; TensorRT {tensorrt_version} builds strongly typed "
            "networks only (use typing: strong or auto)"
        )
    flags: list[str] = []
    if typing == "weak":
        # INT8 enables the Q/DQ graph's int8 kernels; FP16 lets the float layers run in half precision.
        flags += {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"]}[settings.precision]
    if settings.engines.dla_core is not None:
        if major >= STRONG_ONLY_MAJOR and version < FIRST_TENSORRT_11_DLA:
            raise NasquantError(
                f"engines.dla_core: TensorRT {tensorrt_version} has no DLA on a Jetson (NVIDIA: none in "
                "11.0-11.3, 11.4.0 only on Windows on ARM); build DLA engines with TensorRT 10.x (JetPack 6) "
                "or 11.4.1+ (JetPack 7.2.2+ on an AGX Orin)"
            )
        if settings.precision == "fp32":
            raise NasquantError("engines.dla_core: the DLA runs FP16 or INT8 engines only, not fp32")
        if settings.engines.hardware_compatibility != "none":
            raise NasquantError("engines.dla_core: DLA engines cannot be hardware-compatible; set it to none")
        if settings.engines.gpu_fallback:
            flags.append("GPU_FALLBACK")
    return BuildPlan(
        tensorrt_major=major,
        strongly_typed=typing == "strong",
        builder_flags=tuple(flags),
        workspace_bytes=settings.engines.workspace_mb << 20,
        optimization_level=settings.engines.optimization_level,
        hardware_compatibility=_HARDWARE_LEVELS.get(settings.engines.hardware_compatibility),
        dla_core=settings.engines.dla_core,
        profile=settings.profile,
        timing_cache=settings.timing_cache,
        autocast_fp16=typing == "strong" and settings.precision != "fp32",
        precision=settings.precision,
        verbose=settings.engines.verbose,
    )


def trtexec_command(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    settings: EngineSettings,
    *,
    tensorrt_version: str = "10",
) -> str:
    """The ``trtexec`` line that builds the engine :func:`build_engine` would (for machines, like many
    Jetson images, without TensorRT's Python package). With strong typing it expects the AutoCast
    FP16 ONNX (:func:`autocast_command` writes it) instead of ``onnx_path``."""
    plan = build_plan(settings, tensorrt_version=tensorrt_version)
    onnx_path = autocast_path(onnx_path) if plan.autocast_fp16 else Path(onnx_path)
    engine_path = Path(engine_path)
    words = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--skipInference"]
    if plan.strongly_typed and plan.tensorrt_major < STRONG_ONLY_MAJOR:
        words.append("--stronglyTyped")  # always on from TensorRT 11
    words += [f"--{flag.lower()}" for flag in plan.builder_flags if flag in ("FP16", "INT8")]
    words += _profile_flags(plan.profile)
    words += [
        f"--memPoolSize=workspace:{plan.workspace_bytes >> 20}M",
        f"--builderOptimizationLevel={plan.optimization_level}",
    ]
    if plan.hardware_compatibility is not None:
        words.append(
            f"--hardwareCompatibilityLevel={_TRTEXEC_HARDWARE[settings.engines.hardware_compatibility]}"
        )
    if plan.dla_core is not None:
        words.append(f"--useDLACore={plan.dla_core}")
        if "GPU_FALLBACK" in plan.builder_flags:
            words.append("--allowGPUFallback")
    if plan.timing_cache is not None:
        words.append(f"--timingCacheFile={plan.timing_cache}")
    words += [f"--exportLayerInfo={engine_path.with_suffix('.layers.json')}", "--profilingVerbosity=detailed"]
    if plan.verbose:
        words.append("--verbose")
    return shlex.join(words)


def trtexec_timing_command(engine_path: str | os.PathLike, settings: EngineSettings) -> str:
    """The ``trtexec`` line that times a built engine: loaded as built (on its DLA core, if any), fed the
    batch it was tuned for (the profile's optimum; a static engine has its one shape), warmed up, then run
    through a CUDA graph with spin-wait synchronisation and no host<->device copies, so that the reported
    ``GPU Compute Time`` is the engine alone."""
    words = ["trtexec", f"--loadEngine={Path(engine_path)}"]
    if settings.profile is not None:
        words.append(f"--shapes={settings.profile.input_name}:{_dims(settings.profile.opt)}")
    if settings.engines.dla_core is not None:
        words.append(f"--useDLACore={settings.engines.dla_core}")
    words += [f"--warmUp={TIMING_WARMUP_MS}", f"--duration={TIMING_DURATION_S}"]
    words += ["--useCudaGraph", "--noDataTransfers", "--useSpinWait"]
    return shlex.join(words)


def trtexec_fp16_fallback_command(
    onnx_path: str | os.PathLike, engine_path: str | os.PathLike, profile: Profile | None
) -> str:
    """A plain FP16 build of the FP32 graph for targets nasquant does not build for (JetPack 5's TensorRT
    8.5): only options TensorRT 8.5's ``trtexec`` has as well, and no nasquant sidecar. trtexec times
    the engine once it is built."""
    words = ["trtexec", f"--onnx={Path(onnx_path)}", f"--saveEngine={Path(engine_path)}", "--fp16"]
    return shlex.join(words + _profile_flags(profile))


def autocast_command(onnx_path: str | os.PathLike) -> str:
    """The ModelOpt AutoCast line that writes :func:`autocast_path` (the strong-typing FP16 graph)."""
    words = ["python", "-m", "modelopt.onnx.autocast", f"--onnx_path={onnx_path}"]
    words += [f"--output_path={autocast_path(onnx_path)}", "--low_precision_type=fp16", "--keep_io_types"]
    return shlex.join(words)


def _profile_flags(profile: Profile | None) -> list[str]:
    """``--minShapes/--optShapes/--maxShapes`` for a dynamic-batch profile (none for a static graph)."""
    if profile is None:
        return []
    return [
        f"--{bound}Shapes={profile.input_name}:{_dims(getattr(profile, bound))}"
        for bound in ("min", "opt", "max")
    ]


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def _version(version: str) -> tuple[int, int, int]:
    """``(major, minor, patch)`` of a TensorRT version such as ``10.3.0.30`` or ``11``; missing parts are 0."""
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version.strip())
    if match is None:
        raise NasquantError(f"cannot read a TensorRT major version from {version!r}")
    major, minor, patch = (int(part or 0) for part in match.groups())
    return major, minor, patch
