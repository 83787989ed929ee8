"""TensorRT engines from the exported ONNX: build settings, the builder, and the ``trtexec`` hand-off.

INT8 is *explicit* quantization only: the ``*.int8.trt.onnx`` QDQ graph carries every scale, TensorRT
fuses Q/DQ into int8 kernels and runs the layers the recipe kept in floating point in FP16 (or
FP32). TensorRT 10 deprecated and TensorRT 11 removed the implicit calibrator, and TensorRT 11 also
removed the precision builder flags: every network is strongly typed, so FP16 has to be in the graph.
nasquant therefore knows two typings:

* ``weak`` (TensorRT 10, the default there, and what Jetson DLA builds use): the graph as exported,
  with the FP16 / INT8 builder flags allowing lower-precision kernels;
* ``strong`` (TensorRT 11, optional on 10): the graph is first converted to FP16 by ModelOpt's
  AutoCast (Q/DQ kept), and the builder follows the graph's types exactly.

Everything up to the TensorRT calls is plain data (:class:`EngineSettings` -> :class:`BuildPlan` ->
builder calls or ``trtexec`` flags), so the mapping from a recipe to a build is tested without a GPU;
only :func:`build_engine` imports ``tensorrt``, lazily.
"""

from __future__ import annotations

import json
import os
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nasquant._version import __version__
from nasquant.artifacts import (
    INPUT_NAME,
    KEY_INPUT_SIZE,
    KEY_NAMES,
    KEY_PREPROCESS,
    KEY_PROTOCOL,
    EngineSidecar,
    TensorSpec,
    autocast_path,
    file_sha256,
    read_metadata,
)
from nasquant.cuda import INSTALL_HINT, CudaRuntime, import_tensorrt
from nasquant.errors import NasquantError
from nasquant.io import atomic_path
from nasquant.recipe import EnginesSection
from nasquant.settings import Precision

#: oldest TensorRT nasquant builds with: explicit quantization, the I/O tensor API, IProgressMonitor
MIN_TENSORRT_MAJOR = 10
#: first TensorRT major without weak typing (no precision builder flags)
STRONG_ONLY_MAJOR = 11

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
    major = _major(tensorrt_version)
    if major < MIN_TENSORRT_MAJOR:
        raise NasquantError(
            f"TensorRT {tensorrt_version} is too old: nasquant builds with TensorRT {MIN_TENSORRT_MAJOR} or newer "
            "(explicit quantization, the I/O tensor API)"
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
    if plan.profile is not None:
        for bound in ("min", "opt", "max"):
            shape = "x".join(str(d) for d in getattr(plan.profile, bound))
            words.append(f"--{bound}Shapes={plan.profile.input_name}:{shape}")
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


def autocast_command(onnx_path: str | os.PathLike) -> str:
    """The ModelOpt AutoCast line that writes :func:`autocast_path` (the strong-typing FP16 graph)."""
    words = ["python", "-m", "modelopt.onnx.autocast", f"--onnx_path={onnx_path}"]
    words += [f"--output_path={autocast_path(onnx_path)}", "--low_precision_type=fp16", "--keep_io_types"]
    return shlex.join(words)


def autocast_fp16(onnx_path: str | os.PathLike, target: str | os.PathLike | None = None) -> Path:
    """Convert an FP32 or QDQ ONNX file to FP16 where that is safe (ModelOpt AutoCast), keeping float32
    inputs/outputs and the Q/DQ nodes, for a strongly typed FP16 / INT8 build. Runs on the CPU."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as exc:
        raise NasquantError(
            f"strongly typed FP16/INT8 engines need ModelOpt AutoCast ({exc.name or exc} is missing): {INSTALL_HINT}"
        ) from None
    import onnx

    source = Path(onnx_path)
    target = Path(target) if target else autocast_path(source)
    converted = convert_to_mixed_precision(
        onnx_path=str(source), low_precision_type="fp16", keep_io_types=True
    )
    metadata = {
        prop.key: prop.value for prop in onnx.load(str(source), load_external_data=False).metadata_props
    }
    del converted.metadata_props[:]
    for key, value in metadata.items():
        converted.metadata_props.add(key=key, value=value)
    with atomic_path(target) as tmp:
        onnx.save(converted, str(tmp))
    return target


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    settings: EngineSettings,
    *,
    log: Callable[[str], None] = print,
    heartbeat_s: float = 15.0,
) -> EngineSidecar:
    """Build ``engine_path`` (and its sidecar, and ``*.build.log``) from ``onnx_path`` on this GPU."""
    trt = import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise NasquantError(f"{onnx_path}: no such ONNX file")
    plan = build_plan(settings, tensorrt_version=trt.__version__)
    gpu_name, capability = CudaRuntime().device()
    source = onnx_path
    if plan.autocast_fp16:
        log(f"[engine] AutoCast {onnx_path.name} -> FP16 graph for a strongly typed build")
        source = autocast_fp16(onnx_path, autocast_path(engine_path.with_suffix(".onnx")))
    build_log = engine_path.with_suffix(".build.log")
    logger = _file_logger(trt, build_log, verbose=plan.verbose)
    try:
        serialized, cache = _build(trt, logger, source, engine_path, plan, log, heartbeat_s)
    finally:
        logger.handle.close()
    if serialized is None:
        raise NasquantError(f"TensorRT could not build {engine_path.name}; see {build_log}")
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(memoryview(serialized))
    if plan.timing_cache is not None:
        with atomic_path(plan.timing_cache) as tmp:
            tmp.write_bytes(memoryview(cache.serialize()))
    sidecar = _sidecar(trt, engine_path, onnx_path, plan, settings, gpu_name, capability)
    sidecar.write(engine_path)
    return sidecar


def _build(
    trt: Any,
    logger: Any,
    source: Path,
    engine_path: Path,
    plan: BuildPlan,
    log: Callable[[str], None],
    heartbeat_s: float,
) -> tuple[Any, Any]:
    """Parse ``source`` and build it: (serialized engine or None, the timing cache used)."""
    builder = trt.Builder(logger)
    network = builder.create_network(
        1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    )
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise NasquantError(f"{source}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    _configure(trt, builder, config, plan)
    cache = _load_timing_cache(config, plan.timing_cache)
    monitor = _phase_monitor(trt)
    config.progress_monitor = monitor
    with _heartbeat(lambda: monitor.phase, f"[engine] building {engine_path.name}", log, heartbeat_s):
        return builder.build_serialized_network(network, config), cache


def _configure(trt: Any, builder: Any, config: Any, plan: BuildPlan) -> None:
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    config.builder_optimization_level = plan.optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if plan.hardware_compatibility is not None:
        level = getattr(trt.HardwareCompatibilityLevel, plan.hardware_compatibility, None)
        if level is None:
            raise NasquantError(
                f"TensorRT {trt.__version__} has no hardware compatibility level {plan.hardware_compatibility}"
            )
        config.hardware_compatibility_level = level
    if plan.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
    if plan.profile is not None:
        profile = builder.create_optimization_profile()
        profile.set_shape(plan.profile.input_name, plan.profile.min, plan.profile.opt, plan.profile.max)
        config.add_optimization_profile(profile)


def _load_timing_cache(config: Any, path: Path | None) -> Any:
    # A cache from another TensorRT version or GPU is refused by TensorRT; start a fresh one then.
    blob = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _file_logger(trt: Any, path: Path, *, verbose: bool) -> Any:
    """A TensorRT logger writing every message at the chosen severity to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)

    class FileLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.handle = open(path, "w")  # noqa: SIM115 - closed by build_engine after the build

        def log(self, severity: Any, msg: str) -> None:
            threshold = trt.ILogger.Severity.VERBOSE if verbose else trt.ILogger.Severity.INFO
            if int(severity) <= int(threshold):
                self.handle.write(f"[{severity.name}] {msg}\n")
                self.handle.flush()

    return FileLogger()


def _phase_monitor(trt: Any) -> Any:
    """A TensorRT progress monitor remembering the innermost running build phase (for the heartbeat)."""

    class PhaseMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.phases: list[str] = []

        @property
        def phase(self) -> str:
            return self.phases[-1] if self.phases else "starting"

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.phases.append(phase_name)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            if phase_name in self.phases:
                self.phases.remove(phase_name)

    return PhaseMonitor()


@contextmanager
def _heartbeat(
    phase: Callable[[], str], label: str, log: Callable[[str], None], period: float
) -> Iterator[None]:
    """Log ``label`` with the elapsed time and current phase every ``period`` seconds while a block runs."""
    start, stop = time.monotonic(), threading.Event()

    def beat() -> None:
        while not stop.wait(period):
            log(f"{label}: {time.monotonic() - start:.0f} s ({phase()})")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        log(f"{label}: done in {time.monotonic() - start:.0f} s")


def _sidecar(
    trt: Any,
    engine_path: Path,
    onnx_path: Path,
    plan: BuildPlan,
    settings: EngineSettings,
    gpu_name: str,
    capability: str,
) -> EngineSidecar:
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    inputs, outputs = [], []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        spec = TensorSpec(
            name, [int(d) for d in engine.get_tensor_shape(name)], _numpy_dtype(trt, engine, name)
        )
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(spec)
    metadata = read_metadata(onnx_path)
    return EngineSidecar(
        tensorrt_version=trt.__version__,
        gpu_name=gpu_name,
        compute_capability=capability,
        precision=plan.precision,
        typing="strong" if plan.strongly_typed else "weak",
        hardware_compatibility=settings.engines.hardware_compatibility,
        inputs=inputs,
        outputs=outputs,
        onnx_sha256=file_sha256(onnx_path),
        engine_sha256=file_sha256(engine_path),
        profile=plan.profile.to_dict() if plan.profile else None,
        dla_core=plan.dla_core,
        class_names=json.loads(metadata.get(KEY_NAMES, "[]")),
        input_size=int(metadata[KEY_INPUT_SIZE]) if KEY_INPUT_SIZE in metadata else None,
        protocol=metadata.get(KEY_PROTOCOL),
        preprocess=json.loads(metadata[KEY_PREPROCESS]) if KEY_PREPROCESS in metadata else None,
        onnx_metadata={key: value for key, value in metadata.items() if key.startswith("nasquant.")},
        nasquant_version=__version__,
    )


def _numpy_dtype(trt: Any, engine: Any, name: str) -> str:
    import numpy as np

    return np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise NasquantError(f"cannot read a TensorRT major version from {version!r}") from None
