"""Calibration state on disk: one ``amax`` tensor per quantizer, so export and re-validation never recalibrate.

Stored as safetensors (no pickle) with the settings that produced it in the metadata; loading
re-inserts the quantizers into a fused float model and sets their ranges.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nasquant.errors import NasquantError
from nasquant.io import atomic_path
from nasquant.quant.calibrate import insert_quantizers, tensor_quantizers


def calibration_ranges(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{quantizer name: amax}`` of a calibrated model."""
    return {name: quantizer.amax.detach().cpu().contiguous() for name, quantizer in tensor_quantizers(model)}


def write_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` as safetensors (no pickle), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as exc:  # safetensors reports a full disk as its own error type
            raise OSError(f"cannot write {path}: {exc}") from None
    return path


def save_calibration(model: nn.Module, path: str | os.PathLike, *, settings: dict[str, str]) -> Path:
    """Write the calibrated ranges and the settings they came from (``method``, ``per_channel_weights``...)."""
    return write_tensors(path, calibration_ranges(model), {k: str(v) for k, v in settings.items()})


def read_calibration_settings(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return dict(handle.metadata() or {})
    except (OSError, SafetensorError) as exc:
        raise NasquantError(f"cannot read calibration state {path}: {exc}") from exc


def load_calibration(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """A quantized copy of the fused float ``model`` with the ranges stored at ``path``."""
    settings = read_calibration_settings(path)
    try:
        ranges = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise NasquantError(f"cannot read calibration state {path}: {exc}") from exc
    quantized = insert_quantizers(
        model,
        settings.get("method", "max"),
        per_channel_weights=settings.get("per_channel_weights") != "False",
    )
    quantizers = dict(tensor_quantizers(quantized))
    if set(quantizers) != set(ranges):
        missing = sorted(set(quantizers) - set(ranges))[:3]
        extra = sorted(set(ranges) - set(quantizers))[:3]
        raise NasquantError(
            f"calibration state {path} does not fit this model (missing {missing}, unexpected {extra})"
        )
    for name, quantizer in quantizers.items():
        quantizer.amax = ranges[name]
    return quantized
