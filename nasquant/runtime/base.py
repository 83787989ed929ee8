"""The one interface every execution backend implements (torch, ONNX Runtime, TensorRT).

Validation, prediction and benchmarking are written once against :class:`Backend`, the way
polygraphy puts every runtime behind one small runner interface.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from time import perf_counter_ns
from types import MappingProxyType
from typing import TypeVar

import numpy as np

from nasquant.artifacts import END_TO_END_OUTPUT_NAMES, OUTPUT_NAMES
from nasquant.errors import NasquantError

_Opened = TypeVar("_Opened", bound="Backend")
_DEVICE = re.compile(r"(cpu|cuda)(?::([0-9]{1,3}))?")


def parse_device(device: str | None) -> tuple[str, int | None] | None:
    """``"cpu"`` / ``"cuda"`` / ``"cuda:N"`` as ``(kind, index)``; None (or ``""``/``"auto"``) for
    "CUDA when present". Every backend reads ``--device`` through this one rule: torch's other device
    types (meta, mps, ...) and malformed strings are refused here, in one line."""
    if device in (None, "", "auto"):
        return None
    match = _DEVICE.fullmatch(device) if isinstance(device, str) else None
    if match is None or (match.group(1) == "cpu" and match.group(2) is not None):
        raise NasquantError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    return match.group(1), int(match.group(2)) if match.group(2) is not None else None


def contract_outputs(names: Sequence[str], where: object) -> tuple[tuple[str, ...], bool]:
    """The outputs a backend returns, in contract order, and whether the graph is end-to-end: the
    four detection outputs when all are present, else ``boxes``/``scores``, else a foreign graph's
    first two outputs (read as boxes and scores)."""
    if set(END_TO_END_OUTPUT_NAMES) <= set(names):
        return END_TO_END_OUTPUT_NAMES, True
    if set(OUTPUT_NAMES) <= set(names):
        return OUTPUT_NAMES, False
    if len(names) < 2:
        raise NasquantError(f"{where}: expected boxes and scores outputs, found {list(names)}")
    return tuple(names[:2]), False


def float32_outputs(outputs: Sequence[np.ndarray], count: int) -> tuple[np.ndarray, ...]:
    """The first ``count`` rows of each output (padding dropped), float outputs as float32."""
    return tuple(
        out[:count].astype(np.float32, copy=False) if out.dtype.kind == "f" else out[:count]
        for out in outputs
    )


class Backend(ABC):
    """Runs a preprocessed batch and returns decoded network outputs.

    ``run`` takes float32 ``(N, 3, H, W)`` images in [0, 1] and returns the graph's outputs as numpy
    arrays in the order of :data:`~nasquant.artifacts.OUTPUT_NAMES` — ``(boxes, scores)``, float32
    ``(N, A, 4)`` xyxy in input pixels and ``(N, A, C)`` class probabilities — or, for an end-to-end
    graph (NMS inside, ``end_to_end``), of :data:`~nasquant.artifacts.END_TO_END_OUTPUT_NAMES`.

    A backend holds runtime resources (sessions, device memory, CUDA streams): use it as a context
    manager, or call :meth:`close`, which is idempotent.
    """

    #: short backend name: ``torch``, ``onnxruntime``, ``tensorrt``
    name: str
    #: numeric precision of the weights/activations: ``fp32``, ``fp16``, ``int8``
    precision: str
    #: where it runs: ``cpu``, ``cuda:0``, ...
    device: str
    #: the artifact file it runs; None for an in-memory torch module
    path: Path | None = None
    #: what the artifact records about itself (names, preprocessing, ...); empty for a torch module
    metadata: Mapping[str, str] = MappingProxyType({})
    #: the square input size the artifact was built for; None when it takes any size
    input_size: int | None = None
    #: the artifact's fixed batch; None when the batch is dynamic
    batch_size: int | None = None
    #: the graph ends in detections (NMS inside): ``run`` returns ``END_TO_END_OUTPUT_NAMES``
    end_to_end: bool = False
    #: the input's (C, H, W), None where a dimension is dynamic (checked by :meth:`checked_batch`)
    input_shape: tuple[int | None, ...] | None = None
    #: set by :meth:`close`
    closed: bool = False

    @abstractmethod
    def run(self, images: np.ndarray) -> tuple[np.ndarray, ...]: ...

    def close(self) -> None:
        """Release what the backend holds; calling it again does nothing."""
        if not self.closed:
            self.closed = True
            self._release()

    @abstractmethod
    def _release(self) -> None:
        """Free the backend's runtime resources; called once, by :meth:`close`."""

    def __enter__(self: _Opened) -> _Opened:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def padded(self, images: np.ndarray, *, limit: int | None = None) -> tuple[np.ndarray, int]:
        """``images`` padded with zero images to the fixed batch, and the count of real ones: a short
        last batch (validation) runs on a fixed-batch artifact and the padding's outputs are dropped.
        ``limit`` is the largest batch a dynamic artifact accepts (None: any)."""
        if self.closed:
            raise NasquantError(f"{self.describe()} is closed")
        count = len(images)
        largest = self.batch_size or limit
        if count < 1 or (largest is not None and count > largest):
            raise NasquantError(
                f"{self.path.name if self.path else self.describe()} takes batches of 1 to {largest}, "
                f"got {count}; use a smaller batch"
                + (" or export with a dynamic batch" if self.batch_size is not None else "")
            )
        if self.batch_size is None or count == self.batch_size:
            return images, count
        padding = np.zeros((self.batch_size - count, *images.shape[1:]), dtype=images.dtype)
        return np.concatenate([images, padding]), count

    def checked_batch(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        """``images`` as the contiguous float32 ``(N, C, H, W)`` batch the artifact takes, padded to its
        fixed batch (:meth:`padded`), and the count of real ones; a wrong shape is one line."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4:
            raise NasquantError(f"expected a (N, 3, H, W) batch, got shape {images.shape}")
        expected = self.input_shape or (None, None, None)
        if any(
            want is not None and have != want for have, want in zip(images.shape[1:], expected, strict=True)
        ):
            raise NasquantError(
                f"{self.path.name if self.path else self.describe()} takes "
                f"(N, {', '.join(str(d) for d in expected)}) inputs, got {tuple(images.shape)}"
            )
        return self.padded(images)

    def timed_run(self, images: np.ndarray) -> int:
        """Run once and return its duration in nanoseconds: the host clock around :meth:`run` here;
        a GPU backend overrides this with device-side (CUDA event) timing."""
        start = perf_counter_ns()
        self.run(images)
        return perf_counter_ns() - start

    def describe(self) -> str:
        return f"{self.name} {self.precision} on {self.device}"
