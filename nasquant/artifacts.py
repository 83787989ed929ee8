"""The artifact contract: what nasquant's producers write and its consumers read, on the ground floor.

File suffixes and run-folder names, the metadata keys every exported graph carries, the graph's input
and output names, and the engine sidecar's schema (``model.engine.json``): the exporter and the engine
builder write them; the runtime backends, the facade, the report and the deploy guide read them. Nothing
here imports torch, OpenCV or ONNX at import time, so the CLI and the recipe reader load it cheaply;
:func:`read_metadata` imports ``onnx`` when called.

The sidecar exists because a serialized engine only runs on the TensorRT version and, unless built
hardware-compatible, the GPU architecture that built it; TensorRT's own error for a mismatch is a
deserialization failure deep in a log. The sidecar records what the engine needs and contains (I/O
contract, classes, preprocessing, the ONNX it came from), so a runner says in one line why an engine
cannot run here before it tries, and a C++ consumer reads the contract without nasquant.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from nasquant.errors import NasquantError, first_line
from nasquant.io import write_json

# --- files -----------------------------------------------------------------------------------------

#: an exported ONNX graph, run by ONNX Runtime
ONNX_SUFFIX = ".onnx"
#: OpenVINO IR: the graph (``.xml``) and its weights beside it, same stem (``.bin``)
IR_SUFFIX, IR_WEIGHTS_SUFFIX = ".xml", ".bin"
#: Where in an IR's ``rt_info`` nasquant's metadata lives, as one JSON object of strings. (OpenVINO's
#: converter also copies ONNX metadata into ``rt_info/framework``, but that is undocumented and turns
#: each key into an XML element name, which not every metadata key is.)
IR_METADATA = ("nasquant", "metadata")
#: a serialized TensorRT engine, run by TensorRT
ENGINE_SUFFIXES = (".engine", ".plan")
#: every exported file a backend (not a checkpoint loader) opens
EXPORTED_SUFFIXES = (ONNX_SUFFIX, IR_SUFFIX, *ENGINE_SUFFIXES)


#: Input side when neither the user nor the checkpoint says (Deci's COCO models are 640).
DEFAULT_IMGSZ = 640
#: The neck joins stride-8/16/32 maps by 2x up/down-sampling: input sides must divide by 32.
MAX_STRIDE = 32
#: Largest input side nasquant accepts: 4x the usual 1280 of high-resolution detection. One float32
#: 8192^2 image is 805 MB; a larger side only ever comes from a typo or a crafted file.
MAX_INPUT_SIZE = 8192

#: QuantizeLinear/DequantizeLinear with a per-channel ``axis`` exist from opset 13 on.
MIN_OPSET = 13
#: The highest opset torch's TorchScript ONNX exporter writes (``torch.onnx._constants``; a test
#: checks it against the installed torch). ModelOpt's Q/DQ symbolics exist only in that exporter.
MAX_OPSET = 20


# --- a run folder ----------------------------------------------------------------------------------

#: The recipe as run: defaults filled in, ``${VAR}`` expanded, ``--set`` applied, paths absolute.
RESOLVED_NAME = "recipe.resolved.yaml"
#: Per cached stage, the key of its inputs and its JSON result (what ``--resume`` reads).
STAGES_NAME = "stages.json"
#: Each stage's wall time, ``{"stages": [{"stage", "summary", "seconds", "reused"}]}``.
TIMINGS_NAME = "timings.json"
#: The calibration images' file names, one per line (a ``calibration.image_list``).
CALIBRATION_LIST_NAME = "calibration_images.txt"
#: Every quantizer's calibrated range (ModelOpt state), reloaded by ``--resume``.
CALIBRATION_NAME = "calibration.safetensors"


def finetuned_name(stem: str) -> str:
    """The fine-tuned weights and ranges of the INT8 model ``stem`` (``model.int8``), reloaded by ``--resume``."""
    return f"finetuned.{stem}.safetensors"


REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "accuracy_latency.png"
#: The hand-off to whoever ships the model: engine commands, I/O contract, pre/post-processing.
DEPLOY_MD = "DEPLOY.md"
SENSITIVITY_JSON, SENSITIVITY_MD, SENSITIVITY_PNG = "sensitivity.json", "sensitivity.md", "sensitivity.png"
#: Copies of the graphs at the benchmark size, when it differs from the model's input size.
BENCH_FOLDER = "bench"
#: INT8 graph flavours: ``trt`` (ModelOpt's signed Q/DQ, for TensorRT), ``cpu`` (ONNX Runtime's integer kernels).
FLAVORS = ("cpu", "trt")
#: what an end-to-end (NMS inside) copy adds to its raw graph's stem: ``model.int8-nms.trt.onnx``
END_TO_END_TAG = "-nms"


@dataclass(frozen=True)
class ArtifactLayout:
    """Every file of one run folder, named in one place: the pipeline writes through it, the report,
    the deploy guide and ``--resume`` read through it."""

    run_dir: Path

    @property
    def bench_dir(self) -> Path:
        return self.run_dir / BENCH_FOLDER

    @property
    def report_files(self) -> tuple[Path, ...]:
        """What describes a finished run's models (removed when a new run into the folder starts)."""
        return tuple(self.run_dir / name for name in (REPORT_JSON, REPORT_MD, REPORT_PNG, DEPLOY_MD))

    def graph(self, stem: str, flavor: str | None = None, *, bench: bool = False) -> Path:
        """``model.fp32.onnx`` (no flavour) or ``model.int8.cpu.onnx`` / ``model.int8.trt.onnx``;
        with ``bench``, the copy at the benchmark size."""
        if flavor is not None and flavor not in FLAVORS:
            raise ValueError(f"unknown INT8 flavour {flavor!r}; expected one of {', '.join(FLAVORS)}")
        name = f"{stem}.{flavor}{ONNX_SUFFIX}" if flavor else f"{stem}{ONNX_SUFFIX}"
        return (self.bench_dir if bench else self.run_dir) / name


def engine_path(onnx_path: str | os.PathLike, precision: str) -> Path:
    """Where the engine built from an ONNX file goes: ``model.fp32.onnx`` -> ``model.fp16.engine``,
    ``model.int8.trt.onnx`` -> ``model.int8.engine``, ``model.int8-all.trt.onnx`` ->
    ``model.int8-all.engine``, ``model.onnx`` -> ``model.fp16.engine``."""
    onnx_path = Path(onnx_path)
    parts = onnx_path.name.removesuffix(ONNX_SUFFIX).removesuffix(".trt").split(".")
    head, dash, tail = parts[-1].partition("-")
    if len(parts) > 1 and head in ("fp32", "fp16", "int8"):
        parts[-1] = precision + dash + tail
    else:
        parts.append(precision)
    return onnx_path.with_name(".".join(parts) + ENGINE_SUFFIXES[0])


def end_to_end_path(onnx_path: str | os.PathLike) -> Path:
    """Where the end-to-end (NMS) copy of a raw graph goes: ``model.fp32.onnx`` -> ``model.fp32-nms.onnx``,
    ``model.int8.trt.onnx`` -> ``model.int8-nms.trt.onnx`` (so its engine is ``model.int8-nms.engine``)."""
    onnx_path = Path(onnx_path)
    stem = onnx_path.name.removesuffix(ONNX_SUFFIX)
    base, dot, flavor = stem.rpartition(".")
    if dot and flavor in FLAVORS:
        return onnx_path.with_name(f"{base}{END_TO_END_TAG}.{flavor}{ONNX_SUFFIX}")
    return onnx_path.with_name(f"{stem}{END_TO_END_TAG}{ONNX_SUFFIX}")


def autocast_path(onnx_path: str | os.PathLike) -> Path:
    """Where the FP16 AutoCast copy of an ONNX file goes: ``model.int8.trt.onnx`` -> ``model.int8.trt.fp16.onnx``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name.removesuffix(ONNX_SUFFIX) + ".fp16" + ONNX_SUFFIX)


# --- exported graphs -------------------------------------------------------------------------------

#: JSON list of class names, index = class id
KEY_NAMES = "nasquant.names"
#: variant name, e.g. ``yolo_nas_s``
KEY_VARIANT = "nasquant.variant"
#: the graph's (square) input side in pixels
KEY_INPUT_SIZE = "nasquant.input_size"
#: preprocessing protocol name (``sg`` / ``letterbox``)
KEY_PROTOCOL = "nasquant.protocol"
#: JSON of the full preprocessing spec (resize, pad value, rounding)
KEY_PREPROCESS = "nasquant.preprocess"
#: largest network stride: input sides must be multiples of it
KEY_STRIDE = "nasquant.stride"
#: hash of the recipe sections that produced the artifact
KEY_RECIPE_HASH = "nasquant.recipe_hash"
#: nasquant version that wrote the file
KEY_VERSION = "nasquant.version"
#: ``fp32`` or ``int8``
KEY_PRECISION = "nasquant.precision"
#: INT8 flavour: ``trt`` (signed activations) or ``cpu`` (unsigned activations); empty for FP32
KEY_FLAVOR = "nasquant.flavor"
#: JSON list of the layers kept in floating point in an INT8 graph
KEY_FP_LAYERS = "nasquant.fp_layers"
#: JSON of the NMS settings (conf, iou, top_k, max_det, multi_label) an end-to-end graph has built
#: in; absent from a raw graph
KEY_NMS = "nasquant.nms"

INPUT_NAME = "images"
#: a raw graph's outputs: ``boxes`` (N, A, 4) xyxy input pixels, ``scores`` (N, A, C) class probabilities
OUTPUT_NAMES = ("boxes", "scores")
#: an end-to-end graph's outputs, TensorRT EfficientNMS's convention: ``num_dets`` (N, 1) int32,
#: ``det_boxes`` (N, K, 4) xyxy input pixels, ``det_scores`` (N, K), ``det_classes`` (N, K) int32;
#: rows past ``num_dets`` are zero. K is the built-in ``max_det``.
END_TO_END_OUTPUT_NAMES = ("num_dets", "det_boxes", "det_scores", "det_classes")
BATCH_AXIS = "batch"


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """What an exported file records about itself: an ONNX graph's ``metadata_props`` (every key,
    nasquant's and others'), for an engine the metadata of the ONNX it was built from (its sidecar),
    for OpenVINO IR the ONNX's metadata its export kept (empty for an IR nasquant did not write)."""
    path = Path(path)
    if path.suffix.lower() in ENGINE_SUFFIXES:
        return dict(EngineSidecar.read(path).onnx_metadata)
    if path.suffix.lower() == IR_SUFFIX:
        return _ir_metadata(path)
    if not path.is_file():
        raise NasquantError(f"ONNX model not found: {path}")
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError) as exc:
        raise NasquantError(f"cannot read ONNX model {path}: {first_line(exc)}") from None
    if not model.graph.node:
        raise NasquantError(f"cannot read ONNX model {path}: it holds no graph (an empty or foreign file?)")
    return {prop.key: prop.value for prop in model.metadata_props}


def _ir_metadata(path: Path) -> dict[str, str]:
    # Read from the XML itself, so describing an IR needs no OpenVINO. expat expands no external
    # entities and bounds entity amplification, so an untrusted file cannot make this read explode.
    from xml.etree import ElementTree

    if not path.is_file():
        raise NasquantError(f"OpenVINO IR not found: {path}")
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError) as exc:
        raise NasquantError(f"cannot read OpenVINO IR {path}: {first_line(exc)}") from None
    if root.tag != "net":
        raise NasquantError(f"cannot read OpenVINO IR {path}: not an IR (its root is <{root.tag}>)")
    entry = root.find("/".join(("rt_info", *IR_METADATA)))
    if entry is None:
        return {}
    try:
        metadata = json.loads(entry.get("value", ""))
    except ValueError:
        metadata = None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise NasquantError(f"{path}: rt_info {'/'.join(IR_METADATA)} is not a JSON object of strings")
    return metadata


# --- engine sidecars -------------------------------------------------------------------------------

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
