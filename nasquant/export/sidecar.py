"""The JSON file beside every TensorRT engine (``model.engine.json``).

A serialized engine only runs on the TensorRT version and, unless built hardware-compatible, the GPU
architecture that built it; TensorRT's own error for a mismatch is a deserialization failure deep in
a log. The sidecar records what the engine needs and what it contains (I/O contract, classes,
preprocessing, the ONNX it came from), so a runner can say in one line why an engine cannot run here
before it tries, and a C++ consumer can read the contract without nasquant.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from nasquant.errors import NasquantError
from nasquant.io import write_json

SIDECAR_SUFFIX = ".json"
#: compute capability at and above which an ``ampere_plus`` engine runs (NVIDIA Ampere is 8.0)
AMPERE = (8, 0)


@dataclass(frozen=True)
class TensorSpec:
    """One engine input or output: name, shape (``-1`` = dynamic) and numpy dtype name."""

    name: str
    shape: list[int]
    dtype: str


@dataclass(frozen=True)
class EngineSidecar:
    """What an engine was built with and what it computes."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    """``major.minor`` of the GPU that built the engine, e.g. ``7.5`` for a T4."""
    precision: str
    typing: str
    """``strong`` (precisions from the graph) or ``weak`` (builder precision flags)."""
    hardware_compatibility: str
    """``none``, ``ampere_plus`` or ``same_compute_capability``."""
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    onnx_sha256: str
    engine_sha256: str
    profile: dict[str, Any] | None = None
    """``{"input": name, "min": shape, "opt": shape, "max": shape}`` for a dynamic-batch engine."""
    dla_core: int | None = None
    class_names: list[str] = field(default_factory=list)
    input_size: int | None = None
    protocol: str | None = None
    preprocess: dict[str, Any] | None = None
    onnx_metadata: dict[str, str] = field(default_factory=dict)
    """The source ONNX file's ``nasquant.*`` metadata, verbatim (what nasquant reads back)."""
    nasquant_version: str = ""

    def write(self, engine_path: str | os.PathLike) -> Path:
        return write_json(sidecar_path(engine_path), asdict(self))

    @classmethod
    def read(cls, engine_path: str | os.PathLike) -> EngineSidecar:
        path = sidecar_path(engine_path)
        if not path.is_file():
            raise NasquantError(
                f"{path}: no sidecar beside the engine (nasquant writes it when it builds one; "
                "rebuild with `nasquant engine build`)"
            )
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NasquantError(f"{path}: not a readable engine sidecar ({exc})") from None
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        if not isinstance(raw, dict) or not required <= raw.keys():
            missing = sorted(required - (raw.keys() if isinstance(raw, dict) else set()))
            raise NasquantError(f"{path}: engine sidecar lacks {', '.join(missing)}")
        unknown = sorted(raw.keys() - names)
        if unknown:
            raise NasquantError(f"{path}: unknown engine sidecar keys {', '.join(unknown)}")
        try:
            specs = {key: [TensorSpec(**spec) for spec in raw[key]] for key in ("inputs", "outputs")}
        except TypeError as exc:
            raise NasquantError(f"{path}: malformed tensor list ({exc})") from None
        return cls(**{**raw, **specs})

    def check_runtime(
        self,
        engine_path: str | os.PathLike,
        *,
        tensorrt_version: str,
        gpu_name: str,
        compute_capability: str,
    ) -> None:
        """Raise one clear line if this machine cannot run the engine (or the file is not this one)."""
        engine_path = Path(engine_path)
        built = f"TensorRT {self.tensorrt_version} on {self.gpu_name} (sm {self.compute_capability})"
        here = f"TensorRT {tensorrt_version} on {gpu_name} (sm {compute_capability})"
        rebuild = f"rebuild it here from {engine_path.stem}'s ONNX with `nasquant engine build`"
        if file_sha256(engine_path) != self.engine_sha256:
            raise NasquantError(
                f"{engine_path}: the engine does not match its sidecar (sha256 differs); {rebuild}"
            )
        if tensorrt_version != self.tensorrt_version:
            raise NasquantError(f"{engine_path} was built with {built}; this machine has {here}: {rebuild}")
        if not self.runs_on(compute_capability):
            raise NasquantError(
                f"{engine_path} was built for {built} without hardware compatibility; "
                f"this machine has {here}: {rebuild}"
            )

    def runs_on(self, compute_capability: str) -> bool:
        """Whether the hardware-compatibility level lets the engine run on this compute capability."""
        here, built = _capability(compute_capability), _capability(self.compute_capability)
        if self.hardware_compatibility == "ampere_plus":
            return here >= AMPERE
        # "none" engines are tied to the building architecture; TensorRT checks the exact GPU model
        # itself, the compute capability is what the sidecar can tell in advance.
        return here == built


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + SIDECAR_SUFFIX)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _capability(text: str) -> tuple[int, int]:
    try:
        major, minor = (int(part) for part in text.split("."))
    except ValueError:
        raise NasquantError(f"compute capability {text!r} is not of the form major.minor") from None
    return major, minor
