"""ONNX Runtime execution of an exported YOLO-NAS graph (FP32 or INT8 Q/DQ) on CPU or CUDA."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import (
    Fail,
    InvalidArgument,
    InvalidGraph,
    InvalidProtobuf,
    NoModel,
    NoSuchFile,
)
from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

from nasquant.artifacts import KEY_PRECISION
from nasquant.errors import NasquantError, first_line
from nasquant.runtime.base import Backend, contract_outputs, float32_outputs, parse_device

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_CPU, _CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# ORT's warnings here are noise (e.g. initializers left unused by fusion); errors still raise.
_LOG_ERRORS_ONLY = 3


class OnnxRuntimeBackend(Backend):
    """Runs an exported ``.onnx`` with ONNX Runtime; ``run`` follows the :class:`Backend` contract.

    ``device``: ``None``/``"auto"`` (CUDA when ORT has it, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    ``threads``: intra-op threads (``None``: ORT's default, one per physical core); inter-op is 1
    and execution sequential, so timings are reproducible.
    """

    name = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        device: str | None = None,
        threads: int | None = None,
        optimization_level: str = "all",
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise NasquantError(f"ONNX model not found: {self.path}")
        providers, self.device = _providers(device)
        self.session = _session(self.path, providers, _options(optimization_level, threads))
        if device not in (None, "", "auto", "cpu") and self.session.get_providers()[0] != _CUDA:
            # ORT silently falls back to CPU when the CUDA libraries do not load.
            raise NasquantError(
                f"device {device!r} requested but ONNX Runtime could not start its CUDA provider"
            )
        if self.session.get_providers()[0] != _CUDA:
            self.device = "cpu"
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.precision: str = self.metadata.get(KEY_PRECISION) or _graph_precision(self.path)

        model_input = self.session.get_inputs()[0]
        self._input_name = model_input.name
        shape = model_input.shape
        if len(shape) != 4:
            raise NasquantError(f"{self.path}: expected a (N, 3, H, W) image input, found shape {shape}")
        # A symbolic dimension is a string (or None); a fixed one is an int.
        self.batch_size = shape[0] if isinstance(shape[0], int) else None
        self.input_size = shape[2] if isinstance(shape[2], int) else None
        self.input_shape = tuple(d if isinstance(d, int) else None for d in shape[1:])
        outputs = [o.name for o in self.session.get_outputs()]
        self._output_names, self.end_to_end = contract_outputs(outputs, self.path)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        images, count = self.checked_batch(images)
        return float32_outputs(self.session.run(list(self._output_names), {self._input_name: images}), count)

    def _release(self) -> None:
        # ONNX Runtime has no explicit close: the session (and its arena) goes with the last reference.
        del self.session


def optimized_op_types(
    path: str | os.PathLike, *, optimization_level: str = "all", threads: int = 1
) -> Counter[str]:
    """Op types of the graph ONNX Runtime's CPU provider actually executes after its optimizations.

    An INT8 model whose Q/DQ pairs ORT fused shows integer kernels (QLinearConv, QLinearAdd, ...); one
    that still lists only Conv + QuantizeLinear/DequantizeLinear runs fake-quant float math.
    """
    path = Path(path)
    if not path.is_file():
        raise NasquantError(f"ONNX model not found: {path}")
    options = _options(optimization_level, threads)
    with tempfile.TemporaryDirectory(prefix="nasquant-ort-") as folder:
        optimized = Path(folder) / "optimized.onnx"
        options.optimized_model_filepath = str(optimized)
        _session(path, [_CPU], options)
        graph = onnx.load(str(optimized), load_external_data=False).graph
    return Counter(node.op_type for node in graph.node)


def _options(optimization_level: str, threads: int | None) -> ort.SessionOptions:
    if optimization_level not in OPTIMIZATION_LEVELS:
        raise NasquantError(
            f"unknown ONNX Runtime optimization level {optimization_level!r}; "
            f"expected one of {', '.join(OPTIMIZATION_LEVELS)}"
        )
    if threads is not None and threads < 1:
        raise NasquantError(f"threads must be at least 1, got {threads}")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization_level]
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = _LOG_ERRORS_ONLY
    return options


def _providers(device: str | None) -> tuple[list, str]:
    """Execution providers for ``device`` and the device string to report."""
    available = ort.get_available_providers()
    kind, index = parse_device(device) or ("cuda" if _CUDA in available else "cpu", None)
    if kind == "cpu":
        return [_CPU], "cpu"
    if _CUDA not in available:
        raise NasquantError(f"device {device!r} requested but this onnxruntime build has no CUDA provider")
    return [(_CUDA, {"device_id": index or 0}), _CPU], f"cuda:{index or 0}"


def _session(path: Path, providers: list, options: ort.SessionOptions) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    # Not a model ORT can run: empty or truncated file, unknown operator, external data it may not read.
    except (
        InvalidProtobuf,
        InvalidGraph,
        InvalidArgument,
        NoModel,
        NoSuchFile,
        OrtNotImplemented,
        Fail,
    ) as exc:
        raise NasquantError(f"cannot load ONNX model {path}: {first_line(exc)}") from exc


def _graph_precision(path: Path) -> str:
    graph = onnx.load(str(path), load_external_data=False).graph
    return "int8" if any(node.op_type == "QuantizeLinear" for node in graph.node) else "fp32"
