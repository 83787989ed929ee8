"""TensorRT engines from the exported ONNX: the builder.

INT8 is *explicit* quantization only: the ``*.int8.trt.onnx`` QDQ graph carries every scale, TensorRT
fuses Q/DQ into int8 kernels and runs the layers the recipe kept in floating point in FP16 (or
FP32). TensorRT 10 deprecated and TensorRT 11 removed the implicit calibrator, and TensorRT 11 also
removed the precision builder flags: every network is strongly typed, so FP16 has to be in the graph.
nasquant therefore knows two typings:

* ``weak`` (TensorRT 10, the default there, and what Jetson DLA builds use): the graph as exported,
  with the FP16 / INT8 builder flags allowing lower-precision kernels;
* ``strong`` (TensorRT 11, optional on 10): the graph is first converted to FP16 by ModelOpt's
  AutoCast (Q/DQ kept), and the builder follows the graph's types exactly.

Everything up to the TensorRT calls is plain data (:mod:`nasquant.export.engine_plan`), so the mapping
from a recipe to a build is tested without a GPU; only :func:`build_engine` imports ``tensorrt``, lazily.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nasquant._version import __version__
from nasquant.artifacts import (
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
from nasquant.export.engine_plan import BuildPlan, EngineSettings, build_plan
from nasquant.io import atomic_path


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
