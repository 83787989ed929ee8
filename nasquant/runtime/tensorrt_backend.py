"""TensorRT engine runner behind the common :class:`~nasquant.runtime.Backend` interface.

TensorRT 10's I/O tensor API: tensors are bound by name (``set_input_shape`` /
``set_tensor_address``) and the engine runs with ``execute_async_v3`` on one CUDA stream. Device and
pinned host buffers come from NVIDIA's ``cuda-python`` runtime bindings (:mod:`nasquant.cuda`), sized once for the largest
batch the engine accepts. :meth:`TensorRTBackend.timed_run` measures with CUDA events on that
stream (copy in, execute, copy out), not with the host clock.

Before deserializing, the engine's sidecar is checked against this machine (TensorRT version, GPU
architecture, engine hash), so a mismatch is one clear line instead of a deserialization error.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np

from nasquant.artifacts import INPUT_NAME, EngineSidecar
from nasquant.cuda import CudaRuntime, import_tensorrt
from nasquant.errors import NasquantError
from nasquant.runtime.base import Backend, contract_outputs, float32_outputs


class TensorRTBackend(Backend):
    """Runs a ``.engine`` built by nasquant (it reads the ``.engine.json`` sidecar beside it).

    Holds an engine, an execution context, a CUDA stream, two events and a device + pinned host buffer
    per I/O tensor; :meth:`close` frees them all (also when the constructor fails half-way), the way
    polygraphy's runners free theirs on deactivation.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike, *, device: int = 0) -> None:
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise NasquantError(f"{self.path}: no such engine file")
        self.sidecar = EngineSidecar.read(self.path)
        trt = import_tensorrt()
        self.cuda = CudaRuntime()
        gpu_name, capability = self.cuda.device(device)
        self.sidecar.check_runtime(
            self.path, tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=capability
        )
        self.precision = self.sidecar.precision
        self.device = f"cuda:{device}"
        self.metadata = dict(self.sidecar.onnx_metadata)
        self.input_size = self.sidecar.input_size
        self.engine: Any = None
        self.context: Any = None
        self.stream: Any = None
        self.start: Any = None
        self.end: Any = None
        self.buffers: dict[str, _Buffer] = {}
        try:
            self._open(trt, device)
        except BaseException:
            self.close()
            raise

    def _open(self, trt: Any, device: int) -> None:
        rt = self.cuda.rt
        self.cuda.check(rt.cudaSetDevice(device))
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise NasquantError(f"{self.path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        self.stream = self.cuda.check(rt.cudaStreamCreate())
        self.start = self.cuda.check(rt.cudaEventCreate())
        self.end = self.cuda.check(rt.cudaEventCreate())
        self.max_batch = self._max_batch()
        #: the engine's fixed batch, or None for a dynamic-batch engine (the ONNX backend's meaning)
        self.batch_size = self.max_batch if self.engine.get_tensor_shape(INPUT_NAME)[0] >= 0 else None
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            shape = [self.max_batch if d < 0 else int(d) for d in self.engine.get_tensor_shape(name)]
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            self.buffers[name] = _Buffer(self.cuda, shape, dtype)
            self.context.set_tensor_address(name, self.buffers[name].device)
        if INPUT_NAME not in self.buffers:
            raise NasquantError(f"{self.path}: engine lacks the input tensor {INPUT_NAME}")
        outputs = [name for name in self.buffers if name != INPUT_NAME]
        self._output_names, self.end_to_end = contract_outputs(outputs, self.path)

    def _release(self) -> None:
        rt = self.cuda.rt
        for buffer in self.buffers.values():
            buffer.free()
        self.buffers = {}
        for event in (self.start, self.end):
            if event is not None:
                self.cuda.check(rt.cudaEventDestroy(event))
        self.start = self.end = None
        if self.stream is not None:
            self.cuda.check(rt.cudaStreamDestroy(self.stream))
            self.stream = None
        # TensorRT wants an execution context destroyed before the engine it came from.
        self.context = None
        self.engine = None

    def _max_batch(self) -> int:
        shape = self.engine.get_tensor_shape(INPUT_NAME)
        if shape[0] >= 0:
            return int(shape[0])
        # dynamic batch: the profile's maximum (profile 0, the one nasquant builds)
        return int(self.engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0])

    def run(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        return self._execute(images, timed=False)[0]

    def timed_run(self, images: np.ndarray) -> int:
        """Nanoseconds between CUDA events around copy-in, execution and copy-out on the stream."""
        return self._execute(images, timed=True)[1]

    def _execute(self, images: np.ndarray, *, timed: bool) -> tuple[tuple[np.ndarray, ...], int]:
        images, count = self.padded(images, limit=self.max_batch)
        images = np.ascontiguousarray(images, dtype=self.buffers[INPUT_NAME].dtype)
        rt, stream = self.cuda.rt, self.stream
        self.context.set_input_shape(INPUT_NAME, images.shape)
        if timed:
            self.cuda.check(rt.cudaEventRecord(self.start, stream))
        self.buffers[INPUT_NAME].upload(images, stream)
        if not self.context.execute_async_v3(int(stream)):
            raise NasquantError(f"{self.path.name}: TensorRT execution failed")
        outputs = []
        for name in self._output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs.append(self.buffers[name].download(shape, stream))
        if timed:
            self.cuda.check(rt.cudaEventRecord(self.end, stream))
        self.cuda.check(rt.cudaStreamSynchronize(stream))
        elapsed_ns = 0
        if timed:
            elapsed_ns = int(self.cuda.check(rt.cudaEventElapsedTime(self.start, self.end)) * 1e6)
        # copied out of pinned memory, which the next run overwrites
        return float32_outputs([np.array(view) for view in outputs], count), elapsed_ns


class _Buffer:
    """One tensor's device memory and pinned host mirror, sized for the largest batch."""

    def __init__(self, cuda: CudaRuntime, shape: list[int], dtype: np.dtype) -> None:
        self.cuda, self.dtype = cuda, dtype
        self.nbytes = int(np.prod(shape)) * dtype.itemsize
        self.device = int(cuda.check(cuda.rt.cudaMalloc(self.nbytes)))
        try:
            self.pinned = int(cuda.check(cuda.rt.cudaMallocHost(self.nbytes)))
        except NasquantError:
            cuda.check(cuda.rt.cudaFree(self.device))
            raise
        self.host = np.frombuffer((ctypes.c_byte * self.nbytes).from_address(self.pinned), dtype=dtype)

    def free(self) -> None:
        """Return both allocations; the host view goes first, as it points into the pinned memory."""
        self.host = None
        self.cuda.check(self.cuda.rt.cudaFreeHost(self.pinned))
        self.cuda.check(self.cuda.rt.cudaFree(self.device))

    def upload(self, array: np.ndarray, stream: Any) -> None:
        flat = array.reshape(-1)
        self.host[: flat.size] = flat
        self._copy(self.device, self.host.ctypes.data, flat.nbytes, "cudaMemcpyHostToDevice", stream)

    def download(self, shape: tuple[int, ...], stream: Any) -> np.ndarray:
        size = int(np.prod(shape))
        self._copy(
            self.host.ctypes.data, self.device, size * self.dtype.itemsize, "cudaMemcpyDeviceToHost", stream
        )
        return self.host[:size].reshape(shape)

    def _copy(self, target: int, source: int, nbytes: int, kind: str, stream: Any) -> None:
        rt = self.cuda.rt
        self.cuda.check(rt.cudaMemcpyAsync(target, source, nbytes, getattr(rt.cudaMemcpyKind, kind), stream))
