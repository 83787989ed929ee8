"""Execution backends behind one interface: ``run(batch) -> (boxes, scores)``."""

import os
from pathlib import Path

from nasquant.artifacts import ENGINE_SUFFIXES, IR_SUFFIX, ONNX_SUFFIX
from nasquant.errors import NasquantError
from nasquant.runtime.base import Backend, parse_device
from nasquant.runtime.torch_backend import TorchBackend, resolve_device

#: what ``open_backend``'s ``runtime`` may be for an ONNX graph (None: ONNX Runtime)
RUNTIMES = (None, "onnxruntime", "openvino")

__all__ = [
    "Backend",
    "OnnxRuntimeBackend",
    "OpenVINOBackend",
    "TensorRTBackend",
    "TorchBackend",
    "check_device",
    "open_backend",
    "optimized_op_types",
    "parse_device",
    "resolve_device",
]


def __getattr__(name: str):
    # Lazy: onnxruntime is only loaded by code that runs ONNX graphs, not by every torch-only import.
    if name in ("OnnxRuntimeBackend", "optimized_op_types"):
        from nasquant.runtime import onnxruntime_backend

        return getattr(onnxruntime_backend, name)
    if name == "OpenVINOBackend":  # never imports openvino itself (an optional extra): the backend does
        from nasquant.runtime.openvino_backend import OpenVINOBackend

        return OpenVINOBackend
    if name == "TensorRTBackend":  # never imports tensorrt itself: the backend does, when built
        from nasquant.runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend
    raise AttributeError(f"module 'nasquant.runtime' has no attribute {name!r}")


def check_device(path: str | os.PathLike, device: str | None) -> int | None:
    """Refuse a device the artifact cannot run on, before anything is read: an engine runs on CUDA
    only (its index is returned); an ONNX graph on cpu or cuda (None)."""
    parsed = parse_device(device)
    if Path(path).suffix.lower() not in ENGINE_SUFFIXES:
        return None
    kind, index = parsed or ("cuda", None)
    if kind != "cuda":
        raise NasquantError(f"TensorRT engines run on a CUDA device, not {device!r}; use cuda or cuda:N")
    return index or 0


def open_backend(
    path: str | os.PathLike,
    *,
    device: str | None = None,
    threads: int | None = None,
    runtime: str | None = None,
) -> Backend:
    """The backend for an exported model file: ``.onnx`` runs on ONNX Runtime (``device`` picks the
    provider, ``threads`` its intra-op threads), or on OpenVINO (CPU) with ``runtime="openvino"``;
    ``.xml`` (OpenVINO IR) on OpenVINO; ``.engine`` / ``.plan`` on TensorRT (``cuda:N``). ``runtime``
    chooses only for an ONNX graph (``onnxruntime``, ``openvino``; None: ONNX Runtime). Close the
    backend when done (or use ``with``)."""
    suffix = Path(path).suffix.lower()
    if runtime not in RUNTIMES:
        raise NasquantError(
            f"unknown runtime {runtime!r}; expected one of {', '.join(r for r in RUNTIMES if r)}"
        )
    if runtime is not None and suffix != ONNX_SUFFIX and (suffix, runtime) != (IR_SUFFIX, "openvino"):
        raise NasquantError(
            f"runtime {runtime!r} cannot run {Path(path).name}: the runtime is a choice for {ONNX_SUFFIX} "
            f"graphs; {IR_SUFFIX} runs on openvino, {' / '.join(ENGINE_SUFFIXES)} on TensorRT"
        )
    index = check_device(path, device)
    if index is not None:
        from nasquant.runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(path, device=index)
    if runtime == "openvino" or suffix == IR_SUFFIX:
        from nasquant.runtime.openvino_backend import OpenVINOBackend

        return OpenVINOBackend(path, device=device, threads=threads)
    from nasquant.runtime.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(path, device=device, threads=threads)
