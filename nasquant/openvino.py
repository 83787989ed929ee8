"""OpenVINO, shared by the IR export (:mod:`nasquant.export.openvino`) and the backend
(:mod:`nasquant.runtime.openvino_backend`): importing it with the install hint, converting an ONNX graph,
the IR's metadata entry, and OpenVINO's errors as one line.

Both open ONNX through ``ov.convert_model`` (never ``core.read_model``): the converter's transformations
are what make an INT8 Q/DQ graph compute on OpenVINO as on ONNX Runtime (benchmarks/openvino.md), and
so a graph and its IR run the same model. The converter sends usage telemetry to Intel unless opted
out (``opt_in_out --opt_out``, from the ``openvino-telemetry`` package, or ``CI=true``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from nasquant.artifacts import IR_METADATA
from nasquant.errors import NasquantError, first_line

INSTALL_HINT = "pip install 'nasquant[openvino]'"


def import_openvino(purpose: str) -> ModuleType:
    """The ``openvino`` module, or one line naming ``purpose`` and how to install it."""
    try:
        import openvino
    except ImportError:
        raise NasquantError(f"{purpose} needs OpenVINO: {INSTALL_HINT}") from None
    return openvino


def convert_onnx(path: str | os.PathLike, purpose: str) -> Any:
    """``path`` (an ONNX graph) as an OpenVINO model; a graph OpenVINO cannot take is one line."""
    ov = import_openvino(purpose)
    try:
        return ov.convert_model(os.fspath(path))
    except load_errors() as exc:
        raise NasquantError(f"OpenVINO cannot convert {path}: {message(exc)}") from None


def set_ir_metadata(model: Any, metadata: dict[str, str]) -> None:
    """Record ``metadata`` where :func:`nasquant.artifacts.read_metadata` reads an IR's."""
    model.set_rt_info(json.dumps(metadata, sort_keys=True), list(IR_METADATA))


def read_ir(xml_path: Path, purpose: str) -> Any:
    """An IR ``.xml`` (its ``.bin`` beside it) as an OpenVINO model; problems are one line."""
    ov = import_openvino(purpose)
    weights = xml_path.with_suffix(".bin")
    if not weights.is_file():
        raise NasquantError(f"{xml_path}: its weights file {weights.name} is not beside it")
    try:
        return ov.Core().read_model(str(xml_path))
    except RuntimeError as exc:
        raise NasquantError(f"cannot load OpenVINO IR {xml_path}: {message(exc)}") from None


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes in bf16 here (AVX-512 BF16 or AMX): then bf16 is its
    default inference precision, which nasquant pins to f32 unless asked."""
    ov = import_openvino("checking the CPU's bf16 support")
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def message(exc: BaseException) -> str:
    """An OpenVINO error as one line, without the source-location lines (``Exception from src/...``,
    ``Check '...' failed at ...``) that open every message."""
    lines = (line.strip() for line in str(exc).splitlines())
    useful = [line for line in lines if line and not line.startswith(("Exception from ", "Check '"))]
    return " ".join(useful) if useful else first_line(exc)


def load_errors() -> tuple[type[Exception], ...]:
    # What reading or converting a model raises for a file OpenVINO cannot take: the frontends' failures
    # (an operator without a conversion rule, a node that fails validation) are plain Exception
    # subclasses, not RuntimeError, and the converter has an error type of its own.
    from openvino.frontend import (
        GeneralFailure,
        NotImplementedFailure,
        OpConversionFailure,
        OpValidationFailure,
    )
    from openvino.tools.ovc.error import Error as ConverterError

    return (
        RuntimeError,
        ConverterError,
        GeneralFailure,
        NotImplementedFailure,
        OpConversionFailure,
        OpValidationFailure,
    )
