"""Execution backends behind one interface: ``run(batch) -> (boxes, scores)``."""

import os
from pathlib import Path

from nasquant.artifacts import ENGINE_SUFFIXES
from nasquant.errors import NasquantError
from nasquant.runtime.base import Backend, parse_device
from nasquant.runtime.torch_backend import TorchBackend, resolve_device

__all__ = [
    "Backend",
    "OnnxRuntimeBackend",
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
    path: str | os.PathLike, *, device: str | None = None, threads: int | None = None
) -> Backend:
    """The backend for an exported model file: ``.onnx`` runs on ONNX Runtime (``device`` picks the
    provider, ``threads`` its intra-op threads), ``.engine`` / ``.plan`` on TensorRT (``cuda:N``).
    Close it when done (or use ``with``)."""
    index = check_device(path, device)
    if index is not None:
        from nasquant.runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(path, device=index)
    from nasquant.runtime.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(path, device=device, threads=threads)
