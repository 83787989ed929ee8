"""Reading and writing ONNX files, in one place: every graph nasquant writes is checked strictly
(shape and type inference) and lands atomically; every graph it reads fails in one line when it is
missing, truncated or foreign. The exporter and the INT8 flavour passes both go through here."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from nasquant.errors import NasquantError, first_line
from nasquant.io import atomic_path


def save_onnx(
    model: onnx.ModelProto, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None
) -> Path:
    """Check ``model`` (after merging ``metadata`` into its metadata_props) and write it atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        write_checked(model, tmp, metadata or {})
    return path


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file; a missing or unparsable file is a one-line :class:`NasquantError`."""
    path = Path(path)
    if not path.is_file():
        raise NasquantError(f"ONNX model not found: {path}")
    try:
        model = onnx.load(str(path))
    # not an ONNX protobuf (truncated, or another format); external data missing, or outside the
    # model's folder (onnx refuses to read such paths)
    except (DecodeError, onnx.checker.ValidationError, OSError) as exc:
        raise NasquantError(f"cannot read ONNX model {path}: {first_line(exc)}") from None
    if not model.graph.node:
        raise NasquantError(f"cannot read ONNX model {path}: it holds no graph (an empty or foreign file?)")
    return model


def set_metadata(model: onnx.ModelProto, metadata: Mapping[str, str]) -> None:
    """Merge ``metadata`` into ``model.metadata_props`` in place: given keys replace existing ones."""
    check_metadata(metadata)
    merged = {prop.key: prop.value for prop in model.metadata_props}
    merged.update(metadata)
    del model.metadata_props[:]
    for key, value in merged.items():
        model.metadata_props.add(key=key, value=value)


def check_metadata(metadata: Mapping[str, str]) -> None:
    """Refuse metadata that ONNX cannot store (keys and values are strings), before any work is done."""
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"ONNX metadata keys and values must be str, got {key!r}: {value!r}")


def write_checked(model: onnx.ModelProto, target: Path, metadata: Mapping[str, str]) -> None:
    """Merge ``metadata``, check the graph strictly and write it to ``target`` (a temporary name)."""
    set_metadata(model, metadata)
    # full_check adds strict shape/type inference: a mistyped Q/DQ rewrite fails here, not in a runtime.
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(target))
