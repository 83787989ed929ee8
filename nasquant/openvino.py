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

from nasquant.errors import NasquantError, first_line

INSTALL_HINT = "pip install 'nasquant[openvino]'"
#: Where in an IR's ``rt_info`` nasquant's metadata lives, as one JSON object of strings. OpenVINO's
#: converter also copies ONNX metadata into ``rt_info/framework``, but that is undocumented and turns
#: each key into an XML element name, which not every metadata key is.
IR_METADATA = ("nasquant", "metadata")


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


def ir_metadata(model: Any, where: object) -> dict[str, str]:
    """The metadata nasquant's IR export wrote into ``model``'s ``rt_info``; empty for a foreign IR."""
    if not model.has_rt_info(list(IR_METADATA)):
        return {}
    try:
        metadata = json.loads(model.get_rt_info(list(IR_METADATA)).astype(str))
    except json.JSONDecodeError:
        metadata = None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise NasquantError(f"{where}: rt_info {'/'.join(IR_METADATA)} is not a JSON object of strings")
    return metadata


def set_ir_metadata(model: Any, metadata: dict[str, str]) -> None:
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
