"""The TensorRT runner frees everything it allocates.

On the CPU, the two libraries it talks to are replaced at their boundary: the CUDA runtime namespace
(``cuda.bindings.runtime``: real host memory stands in for device memory, so copies really copy) and
the ``tensorrt`` module (an engine with the runner's I/O tensors). The test then counts every
allocation against its release. With cuda-python and a GPU, the buffers are also exercised on the real
CUDA runtime (device memory returns to the driver).
"""

from __future__ import annotations

import ctypes
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from nasquant.artifacts import INPUT_NAME, OUTPUT_NAMES
from nasquant.cuda import CudaRuntime
from nasquant.errors import NasquantError
from nasquant.runtime import tensorrt_backend
from nasquant.runtime.tensorrt_backend import TensorRTBackend, _Buffer
from tests.crafted import fake_engine

ANCHORS, CLASSES = 10, 3


class FakeCudaRuntime:
    """``cuda.bindings.runtime`` as the runner calls it, recording what is live."""

    class cudaError_t:  # noqa: N801 - the binding's own spelling
        cudaSuccess = 0

    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self) -> None:
        self.live: dict[str, set[int]] = {"device": set(), "pinned": set(), "stream": set(), "event": set()}
        self.calls: Counter[str] = Counter()
        self._memory: dict[int, ctypes.Array] = {}
        self._handles = 1000

    def _alloc(self, kind: str, nbytes: int) -> tuple[int, int]:
        block = ctypes.create_string_buffer(nbytes)
        address = ctypes.addressof(block)
        self._memory[address] = block
        self.live[kind].add(address)
        return 0, address

    def _release(self, kind: str, handle: int) -> tuple[int]:
        assert handle in self.live[kind], f"{kind} {handle} freed twice or never allocated"
        self.live[kind].remove(handle)
        self._memory.pop(handle, None)
        return (0,)

    def _handle(self, kind: str) -> tuple[int, int]:
        self._handles += 1
        self.live[kind].add(self._handles)
        return 0, self._handles

    def cudaGetDeviceCount(self):  # noqa: N802
        return 0, 1

    def cudaGetDeviceProperties(self, index):  # noqa: N802
        return 0, types.SimpleNamespace(name=b"Fake GPU\x00", major=8, minor=9)

    def cudaGetErrorString(self, error):  # noqa: N802
        return 0, b"fake error"

    def cudaSetDevice(self, index):  # noqa: N802
        return (0,)

    def cudaMalloc(self, nbytes):  # noqa: N802
        return self._alloc("device", nbytes)

    def cudaMallocHost(self, nbytes):  # noqa: N802
        return self._alloc("pinned", nbytes)

    def cudaFree(self, address):  # noqa: N802
        return self._release("device", address)

    def cudaFreeHost(self, address):  # noqa: N802
        return self._release("pinned", address)

    def cudaStreamCreate(self):  # noqa: N802
        return self._handle("stream")

    def cudaStreamDestroy(self, stream):  # noqa: N802
        return self._release("stream", stream)

    def cudaEventCreate(self):  # noqa: N802
        return self._handle("event")

    def cudaEventDestroy(self, event):  # noqa: N802
        return self._release("event", event)

    def cudaEventRecord(self, event, stream):  # noqa: N802
        return (0,)

    def cudaEventElapsedTime(self, start, end):  # noqa: N802
        return 0, 1.5

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        return (0,)

    def cudaMemcpyAsync(self, target, source, nbytes, kind, stream):  # noqa: N802
        self.calls["copy"] += 1
        ctypes.memmove(target, source, nbytes)
        return (0,)


class FakeEngine:
    """An engine with a dynamic batch (1..4) and the runner's three tensors."""

    def __init__(self, log: list[str], tensors: tuple[str, ...]) -> None:
        self.log, self.tensors = log, tensors
        self.num_io_tensors = len(tensors)

    def get_tensor_name(self, index: int) -> str:
        return self.tensors[index]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return {INPUT_NAME: (-1, 3, 32, 32), "boxes": (-1, ANCHORS, 4), "scores": (-1, ANCHORS, CLASSES)}[
            name
        ]

    def get_tensor_dtype(self, name: str) -> str:
        return "float32"

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple:
        return (1, 3, 32, 32), (2, 3, 32, 32), (4, 3, 32, 32)

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self)

    def __del__(self) -> None:
        self.log.append("engine")


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.addresses, self.shape = engine, {}, None

    def set_tensor_address(self, name: str, address: int) -> None:
        self.addresses[name] = address

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def execute_async_v3(self, stream: int) -> bool:
        # boxes[i] = the mean of image i, so the test sees which rows came back
        batch = self.shape[0]
        images = np.ctypeslib.as_array(
            ctypes.cast(self.addresses[INPUT_NAME], ctypes.POINTER(ctypes.c_float)), (batch, 3 * 32 * 32)
        )
        boxes = np.ctypeslib.as_array(
            ctypes.cast(self.addresses["boxes"], ctypes.POINTER(ctypes.c_float)), (batch, ANCHORS * 4)
        )
        boxes[:] = images.mean(axis=1, keepdims=True)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (self.shape[0], *self.engine.get_tensor_shape(name)[1:])

    def __del__(self) -> None:
        self.engine.log.append("context")


def fake_tensorrt(log: list[str], tensors: tuple[str, ...] = (INPUT_NAME, *OUTPUT_NAMES)) -> types.ModuleType:
    module = types.ModuleType("tensorrt")
    module.__version__ = "10.9.0"
    module.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})

    class Runtime:
        def __init__(self, logger: object) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine:
            return FakeEngine(log, tensors)

    module.Runtime = Runtime
    module.nptype = np.dtype
    return module


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCudaRuntime:
    rt = FakeCudaRuntime()

    def runtime_with_fake_bindings(self: CudaRuntime) -> None:
        self.rt = rt

    monkeypatch.setattr(CudaRuntime, "__init__", runtime_with_fake_bindings)
    return rt


def engine_file(folder: Path) -> Path:
    return fake_engine(
        folder / "model.int8.engine",
        tensorrt_version="10.9.0",
        gpu_name="Fake GPU",
        compute_capability="8.9",
        input_size=32,
    )


def assert_nothing_live(rt: FakeCudaRuntime) -> None:
    assert {kind: handles for kind, handles in rt.live.items() if handles} == {}


def test_a_closed_runner_has_freed_every_allocation(
    fake_cuda: FakeCudaRuntime, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    log: list[str] = []
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt", lambda: fake_tensorrt(log))
    images = np.stack([np.full((3, 32, 32), value, dtype=np.float32) for value in (0.25, 0.5, 0.75)])
    with TensorRTBackend(engine_file(tmp_path)) as backend:
        # three buffers (device + pinned each), one stream, two events while open
        assert {kind: len(handles) for kind, handles in fake_cuda.live.items()} == {
            "device": 3,
            "pinned": 3,
            "stream": 1,
            "event": 2,
        }
        boxes, scores = backend.run(images)
        assert backend.timed_run(images[:1]) == 1_500_000
        assert (backend.batch_size, backend.max_batch, backend.input_size) == (None, 4, 32)
    np.testing.assert_allclose(boxes[:, 0, 0], [0.25, 0.5, 0.75])
    assert scores.shape == (3, ANCHORS, CLASSES)
    assert_nothing_live(fake_cuda)
    assert log == ["context", "engine"]  # the context goes before its engine
    backend.close()  # a second close does nothing (no double free: the fake would fail)
    with pytest.raises(NasquantError, match="is closed"):
        backend.run(images)


def test_a_constructor_that_fails_half_way_frees_what_it_allocated(
    fake_cuda: FakeCudaRuntime, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    log: list[str] = []
    monkeypatch.setattr(
        tensorrt_backend, "import_tensorrt", lambda: fake_tensorrt(log, (INPUT_NAME, "boxes"))
    )
    with pytest.raises(NasquantError, match=r"expected boxes and scores outputs, found \[.boxes.\]"):
        TensorRTBackend(engine_file(tmp_path))
    assert_nothing_live(fake_cuda)
    assert log == ["context", "engine"]


def test_a_failed_pinned_allocation_returns_the_device_memory(fake_cuda: FakeCudaRuntime) -> None:
    fake_cuda.cudaMallocHost = lambda nbytes: (2, 0)  # cudaErrorMemoryAllocation
    with pytest.raises(NasquantError, match="CUDA error: fake error"):
        _Buffer(CudaRuntime(), [4, 3], np.dtype(np.float32))
    assert_nothing_live(fake_cuda)


def test_a_batch_beyond_the_profile_is_one_clear_error(
    fake_cuda: FakeCudaRuntime, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt", lambda: fake_tensorrt([]))
    with (
        TensorRTBackend(engine_file(tmp_path)) as backend,
        pytest.raises(
            NasquantError, match="model.int8.engine takes batches of 1 to 4, got 5; use a smaller batch$"
        ),
    ):
        backend.run(np.zeros((5, 3, 32, 32), dtype=np.float32))
    assert_nothing_live(fake_cuda)


def _real_cuda() -> CudaRuntime | None:
    try:
        runtime = CudaRuntime()
        runtime.device()
    except NasquantError:
        return None
    return runtime


@pytest.mark.gpu
@pytest.mark.skipif(_real_cuda() is None, reason="needs cuda-python and a CUDA GPU")
def test_buffers_round_trip_and_return_their_memory_on_a_real_gpu() -> None:
    cuda = _real_cuda()
    rt = cuda.rt
    stream = cuda.check(rt.cudaStreamCreate())
    data = np.random.default_rng(0).random((8, 3, 64, 64), dtype=np.float32)
    buffer = _Buffer(cuda, list(data.shape), data.dtype)
    buffer.upload(data, stream)
    back = buffer.download(data.shape, stream)
    cuda.check(rt.cudaStreamSynchronize(stream))
    np.testing.assert_array_equal(back, data)
    buffer.free()
    cuda.check(rt.cudaDeviceSynchronize())
    free_before, _ = cuda.check(rt.cudaMemGetInfo())
    for _ in range(20):  # 20 × 256 MiB: a leak would be 5 GiB
        cuda_buffer = _Buffer(cuda, [64, 1024, 1024], np.dtype(np.float32))
        cuda_buffer.free()
    cuda.check(rt.cudaDeviceSynchronize())
    free_after, _ = cuda.check(rt.cudaMemGetInfo())
    cuda.check(rt.cudaStreamDestroy(stream))
    assert free_before - free_after < 256 << 20
