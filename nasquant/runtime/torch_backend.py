"""PyTorch execution of a YOLO-NAS module on CPU or CUDA, in fp32 or fp16."""

from __future__ import annotations

import copy

import numpy as np
import torch

from nasquant.errors import NasquantError
from nasquant.runtime.base import Backend

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when present; otherwise the named device, checked to exist."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise NasquantError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise NasquantError(f"device {device!r} requested but no CUDA device is available")
    return resolved


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
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(
            self._device, self._dtype, non_blocking=True
        )
        boxes, scores = self.model(batch)
        return boxes.float().cpu().numpy(), scores.float().cpu().numpy()
