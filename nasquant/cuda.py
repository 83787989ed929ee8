"""The CUDA runtime through NVIDIA's ``cuda-python`` bindings, for the TensorRT builder and runner.

Neither needs PyTorch's CUDA build: nasquant's own environment pins CPU torch, and a TensorRT host
gets ``cuda-python`` with ``nasquant[tensorrt]``. Imported lazily; nothing here loads at
``import nasquant``.
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
