"""Execution backends behind one interface: ``run(batch) -> (boxes, scores)``."""

from nasquant.runtime.base import Backend
from nasquant.runtime.torch_backend import TorchBackend, resolve_device

__all__ = ["Backend", "OnnxRuntimeBackend", "TorchBackend", "optimized_op_types", "resolve_device"]


def __getattr__(name: str):
    # Lazy: onnxruntime is only loaded by code that runs ONNX graphs, not by every torch-only import.
    if name in ("OnnxRuntimeBackend", "optimized_op_types"):
        from nasquant.runtime import onnxruntime_backend

        return getattr(onnxruntime_backend, name)
    raise AttributeError(f"module 'nasquant.runtime' has no attribute {name!r}")
