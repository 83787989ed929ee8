"""The one interface every execution backend implements (torch, ONNX Runtime, TensorRT).

Validation, prediction and benchmarking are written once against :class:`Backend`, the way
polygraphy puts every runtime behind one small runner interface.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from time import perf_counter_ns

import numpy as np

from nasquant.errors import NasquantError

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


class Backend(ABC):
    """Runs a preprocessed batch and returns decoded network outputs.

    ``run`` takes float32 ``(N, 3, H, W)`` images in [0, 1] and returns ``(boxes, scores)`` as float32
    numpy arrays: ``(N, A, 4)`` xyxy in input pixels and ``(N, A, C)`` class probabilities.
    """

    #: short backend name: ``torch``, ``onnxruntime``, ``tensorrt``
    name: str
    #: numeric precision of the weights/activations: ``fp32``, ``fp16``, ``int8``
    precision: str
    #: where it runs: ``cpu``, ``cuda:0``, ...
    device: str

    @abstractmethod
    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def timed_run(self, images: np.ndarray) -> int:
        """Run once and return its duration in nanoseconds: the host clock around :meth:`run` here;
        a GPU backend overrides this with device-side (CUDA event) timing."""
        start = perf_counter_ns()
        self.run(images)
        return perf_counter_ns() - start

    def describe(self) -> str:
        return f"{self.name} {self.precision} on {self.device}"
