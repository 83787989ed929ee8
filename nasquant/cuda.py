"""NVIDIA's libraries for the TensorRT builder and runner: the CUDA runtime through ``cuda-python``'s
bindings, and ``tensorrt`` itself.

Neither needs PyTorch's CUDA build: nasquant's own environment pins CPU torch, and a TensorRT host
gets both with ``nasquant[tensorrt]``. Both load lazily: nothing here imports them at ``import
nasquant``. The builder (export) and the runner (runtime) import them from here, so the runner does not
depend on the builder.
"""

from __future__ import annotations

from typing import Any

from nasquant.errors import NasquantError

INSTALL_HINT = "pip install 'nasquant[tensorrt]' on a machine with an NVIDIA GPU"


class CudaRuntime:
    """``cuda.bindings.runtime`` (``cuda.cudart`` before cuda-python 12.6) with error checking."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime
        except ImportError:
            try:
                from cuda import cudart as runtime
            except ImportError:
                raise NasquantError(f"cuda-python is not installed: {INSTALL_HINT}") from None
        self.rt = runtime

    def check(self, result: tuple) -> Any:
        """Unpack ``(error, value...)``; raise the CUDA error string on failure."""
        error, *values = result
        if error != self.rt.cudaError_t.cudaSuccess:
            _, text = self.rt.cudaGetErrorString(error)
            raise NasquantError(f"CUDA error: {text.decode() if isinstance(text, bytes) else text}")
        return values[0] if len(values) == 1 else tuple(values) or None

    def device(self, index: int = 0) -> tuple[str, str]:
        """``(name, "major.minor")`` of CUDA device ``index``, or one line saying there is none."""
        error, count = self.rt.cudaGetDeviceCount()
        if error != self.rt.cudaError_t.cudaSuccess or count <= index:
            raise NasquantError("no CUDA device: TensorRT engines are built and run on an NVIDIA GPU")
        properties = self.check(self.rt.cudaGetDeviceProperties(index))
        name = properties.name
        name = name.decode(errors="replace").rstrip("\x00") if isinstance(name, bytes) else str(name)
        return name, f"{properties.major}.{properties.minor}"


def tensorrt_unavailable() -> str | None:
    """Why this machine cannot build or run engines (``tensorrt not installed``, ``cuda-python not
    installed``, ``no CUDA device``), or None when it can: the reason on a skipped report row."""
    try:
        import_tensorrt()
    except NasquantError:
        return "tensorrt not installed"
    try:
        runtime = CudaRuntime()
    except NasquantError:
        return "cuda-python not installed"
    try:
        runtime.device()
    except NasquantError:
        return "no CUDA device"
    return None


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or one clear line saying it is not installed."""
    try:
        import tensorrt
    except ImportError:
        raise NasquantError(f"tensorrt is not installed: {INSTALL_HINT}") from None
    return tensorrt
