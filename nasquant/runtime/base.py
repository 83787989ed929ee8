"""The one interface every execution backend implements (torch, ONNX Runtime, TensorRT).

Validation, prediction and benchmarking are written once against :class:`Backend`, the way
polygraphy puts every runtime behind one small runner interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from time import perf_counter_ns

import numpy as np


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
