"""PyTorch execution of a YOLO-NAS module on CPU or CUDA, in fp32 or fp16."""

from __future__ import annotations

import copy

import numpy as np
import torch

from nasquant.errors import NasquantError
from nasquant.runtime.base import Backend, parse_device

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when present; otherwise the named device, checked to exist."""
    parsed = parse_device(device)
    if parsed is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, index = parsed
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise NasquantError(f"device {device!r} requested but no CUDA device is available")
        if index is not None and index >= torch.cuda.device_count():
            raise NasquantError(
                f"device {device!r} requested but there are {torch.cuda.device_count()} CUDA devices"
            )
    return torch.device(kind, index)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model: torch.nn.Module, *, device: str | None = None, precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise NasquantError(
                f"torch backend precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
            )
        self._device = resolve_device(device)
        if precision == "fp16" and self._device.type != "cuda":
            raise NasquantError("fp16 inference needs a CUDA device; use fp32 on CPU")
        self._dtype = PRECISIONS[precision]
        self.precision = precision
        self.device = str(self._device)
        # A private copy, so casting to fp16 or moving to the GPU never changes the caller's module.
        needs_copy = self._dtype != torch.float32 or self._device.type != "cpu"
        module = copy.deepcopy(model) if needs_copy else model
        self.model = module.eval().to(device=self._device, dtype=self._dtype)

    @torch.inference_mode()
    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.closed:
            raise NasquantError(f"{self.describe()} is closed")
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(
            self._device, self._dtype, non_blocking=True
        )
        boxes, scores = self.model(batch)
        return boxes.float().cpu().numpy(), scores.float().cpu().numpy()

    def _release(self) -> None:
        # Drops the reference (the device copy, when one was made); the caller's module stays as it was.
        del self.model
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
