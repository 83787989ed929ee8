"""Execution backends behind one interface: ``run(batch) -> (boxes, scores)``."""

from nasquant.runtime.base import Backend
from nasquant.runtime.torch_backend import TorchBackend, resolve_device

__all__ = ["Backend", "TorchBackend", "resolve_device"]
