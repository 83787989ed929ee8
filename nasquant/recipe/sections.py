"""The recipe's typed sections: every field, its type, default, bounds and meaning, written once.
:mod:`nasquant.recipe.loading` reads YAML into them; stages read them as plain attributes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from nasquant.artifacts import MAX_INPUT_SIZE, MAX_OPSET, MAX_STRIDE, MIN_OPSET, RESOLVED_NAME
from nasquant.errors import NasquantError
from nasquant.io import atomic_path
from nasquant.settings import (
    DEFAULT_FLOAT_WEIGHTS,
    PREDICT_NMS,
    VAL_NMS,
    CalibrationMethod,
    FloatWeights,
    HardwareCompatibility,
    NMSSettings,
    Precision,
    Protocol,
    Typing,
    Variant,
)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _constrained(
    default: Any = MISSING,
    *,
    factory: Any = MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    multiple_of: int | None = None,
    nonempty: bool = False,
    unique: bool = False,
    pattern: tuple[str, str] | None = None,
    path: bool = False,
) -> Any:
    """A dataclass field plus the checks the generic validator runs on its value.


    Bounds apply to a number or to every number of a list; ``nonempty`` to strings and lists;
    ``pattern`` is (regex, what it means in words); ``path`` marks a value resolved against the recipe
    folder (and implies ``nonempty``: an empty path would silently mean the folder itself).
    """
    metadata = {
        "ge": ge,
        "gt": gt,
        "le": le,
        "multiple_of": multiple_of,
        "nonempty": nonempty or path,
        "unique": unique,
        "pattern": pattern,
        "path": path,
    }
    return field(default=default, default_factory=factory, metadata=metadata)


@dataclass(frozen=True)
class ModelSection:
    """The FP32 network to quantize."""

    checkpoint: str = _constrained(path=True)
    """Required. A .pt/.pth/.safetensors file, a folder holding one, a URL, or ``yolo_nas_s|m|l``."""
    variant: Variant | None = None
    """Expected architecture; checked against the weights when they load (None = whatever they are)."""
    sha256: str | None = _constrained(None, pattern=(r"[0-9a-fA-F]{64}", "64 hexadecimal characters"))
    """Pinned hash of the checkpoint file; downloads and local files must match it."""
    class_names: list[str] | None = _constrained(None, nonempty=True, unique=True)
    """Overrides the names stored in the checkpoint (None = the checkpoint's, else COCO's 80)."""


@dataclass(frozen=True)
class InputSection:
    """The network input every artifact is built for."""

    size: int | None = _constrained(None, ge=MAX_STRIDE, le=MAX_INPUT_SIZE, multiple_of=MAX_STRIDE)
    """Square input side in pixels (None = the checkpoint's own, else 640); YOLO-NAS strides need /32."""
    batch: int = _constrained(1, ge=1)
    """Batch dimension baked into the exported graph when ``export.dynamic_batch`` is false."""


@dataclass(frozen=True)
class CalibrationSection:
    """Images that set the activation ranges, and how the ranges are computed from them."""

    data: str | None = _constrained(None, path=True)
    """COCO json, YOLO data yaml or image folder; required to quantize. Never the validation images."""
    format: Literal["auto", "coco", "yolo", "images"] = "auto"
    """How to read ``data`` (auto = decide from what it is)."""
    image_list: str | None = _constrained(None, path=True)
    """Text file with one image file name per line: exactly these images, in this order."""
    num_images: int = _constrained(512, ge=1)
    """How many images calibrate (the first N of ``image_list``, else a seeded draw)."""
    batch_size: int = _constrained(8, ge=1)
    """Images per calibration forward pass (memory only; the ranges do not depend on it)."""
    seed: int = _constrained(0, ge=0)
    """Seed of the draw when there is no ``image_list``, so the same folder gives the same images."""
    method: CalibrationMethod = "max"
    """Activation range: max, or a histogram reduced by percentile / entropy / mse. ``max`` by the race
    (benchmarks/calibrators.md, shapes, with bias correction, mean of 3 draws): entropy, mse and
    percentile 99.999 lose to it on ONNX Runtime and the TensorRT flavour and tie on OpenVINO;
    percentile 99.99 clips the heads (−0.35 to −0.40 points)."""
    percentile: float = _constrained(99.99, gt=0, le=100)
    """Percentile of the histogram kept when ``method`` is percentile (0 < p <= 100)."""
    allow_overlap: bool = False
    """Calibrating on validation images inflates the INT8 mAP, so an overlap is refused unless true."""


@dataclass(frozen=True)
class QuantizationSection:
    """Which layers become INT8."""

    per_channel_weights: bool = True
    """Per-output-channel weight scales (what TensorRT's explicit quantization expects)."""
    skip: list[str] | Literal["auto"] = _constrained(factory=list, unique=True)
    """Module-name glob patterns kept in floating point, e.g. ``heads.*.cls_pred``; or ``auto``: the
    smallest set the sensitivity search finds within ``max_map_drop`` / ``max_fp_layers``."""
    max_map_drop: float | None = _constrained(None, ge=0, le=1)
    """With ``skip: auto``: the mAP50-95 (a fraction, 0.003 = 0.3 points) INT8 may lose vs FP32."""
    max_fp_layers: int | None = _constrained(None, ge=0)
    """With ``skip: auto``: at most this many layers in floating point."""
    sensitivity_images: int = _constrained(16, ge=1)
    """Validation images the per-layer SQNR is measured on (the analysis cost is linear in it)."""
    sensitivity_top_k: int = _constrained(8, ge=0)
    """Layers (by recovery) that also get a real mAP in the sensitivity analysis."""
    sensitivity_val_images: int | None = _constrained(None, ge=1)
    """Validation images behind every mAP of the analysis and the search (the first N of the validation
    subset; null = all of it). Each mAP there is one validation of this many images, so on COCO
    (5,000) a few hundred keep the search practical; the report still validates on the whole subset."""

    def _cross_checks(self) -> list[tuple[str, str]]:
        if self.skip == "auto" and self.max_map_drop is None and self.max_fp_layers is None:
            return [("skip", "auto needs a budget: set max_map_drop and/or max_fp_layers")]
        return []

    quantize_all_baseline: bool = True
    """Also build the "quantize everything" model, as a report row that shows what ``skip`` buys."""
    bias_correction: bool = True
    """Fold each quantized conv's mean output shift, measured on the calibration images, into its bias
    (:mod:`nasquant.quant.bias_correction`; NNCF's FastBiasCorrection idea): the TensorRT flavour's
    measured on its signed grids, the CPU flavour's (and so OpenVINO's) on its unsigned ones. On by
    the evidence (benchmarks/calibrators.md, shapes, mean of 3 calibration draws, Δ mAP points vs
    FP32): selective CPU flavour −0.07 → +0.01, on OpenVINO −0.11 → −0.01, TensorRT flavour −0.11 →
    +0.08; costs two passes over the calibration images per INT8 model."""


@dataclass(frozen=True)
class FinetuneSection:
    """Quantization-aware distillation after calibration (:mod:`nasquant.quant.distill`): each INT8
    model fine-tuned toward the FP32 model's own head outputs on the calibration images, no labels."""

    enabled: bool = False
    """Run the ``finetune`` stage (minutes on a CPU; the PTQ levers alone are the default)."""
    steps: int = _constrained(100, ge=1)
    """Optimizer steps, one calibration batch each."""
    learning_rate: float = _constrained(1e-5, gt=0, le=1)
    """Adam's initial rate, decayed to 0 on a cosine."""
    learn_ranges: bool = False
    """Also learn the quantizers' ranges (LSQ on ``log amax``, from the calibrated ones); off keeps the
    calibrated ranges and trains the weights only. Shapes fixture, 3 draws (benchmarks/calibrators.md):
    no gain where the PTQ levers left nothing to recover; on a calibration that clips (percentile
    99.99, CPU flavour −0.38) it recovers 0.16 points where the kept ranges recover 0.13, and 0.28 at
    ``range_learning_rate`` 1e-2 (which costs the unclipped ``max`` calibration 0.10 on TensorRT's grids,
    nine draws: benchmarks/distillation_paired.md). On ``max``, nine paired draws, learning at the
    default 1e-3 costs 0.05 ± 0.02 points on both flavours (benchmarks/distillation_ranges_learned.md)
    where keeping the ranges costs 0.03 ± 0.03: off by default."""
    range_learning_rate: float = _constrained(1e-3, gt=0, le=1)
    """Adam's initial rate for the ranges (``learn_ranges``): a relative step of each range, cosine-decayed."""
    batch_size: int = _constrained(8, ge=1)
    """Calibration images per step."""
    seed: int = _constrained(0, ge=0)
    """Seed of the batch order and the flips."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where it trains: auto = CUDA when present, else the CPU."""


@dataclass(frozen=True)
class ExportSection:
    """ONNX export."""

    opset: int = _constrained(17, ge=MIN_OPSET, le=MAX_OPSET)
    """ONNX opset: 13 is the first with per-channel QuantizeLinear/DequantizeLinear, 20 the highest the
    TorchScript exporter (the one with ModelOpt's Q/DQ) writes."""
    dynamic_batch: bool = False
    """Export the batch dimension as dynamic instead of ``input.batch``."""
    simplify: bool = True
    """Constant-fold and simplify the exported graph."""
    float_weights: FloatWeights = DEFAULT_FLOAT_WEIGHTS
    """How an INT8 graph stores the weights of its floating-point layers (quantized layers' weights are
    int8): float16 halves their bytes, exactly for a half-precision checkpoint (Ultralytics-style
    ``.pt``, the shapes fixture) and otherwise rounded as TensorRT runs them anyway (INT8 engines
    enable FP16); float32 keeps a float32 checkpoint's outputs bit-identical on CPU runtimes."""
    nms: bool = False
    """Also write an end-to-end copy of each graph (``model.int8-nms.trt.onnx``, ...): NMS inside, outputs
    ``num_dets``/``det_boxes``/``det_scores``/``det_classes`` (DEPLOY.md), with the ``nms_*`` settings."""
    nms_conf: float = _constrained(PREDICT_NMS.conf, gt=0, le=1)
    """End-to-end graphs: score threshold per (anchor, class); a deployment value, not mAP's 0.01."""
    nms_iou: float = _constrained(PREDICT_NMS.iou, gt=0, le=1)
    """End-to-end graphs: class-aware NMS IoU threshold."""
    nms_top_k: int = _constrained(PREDICT_NMS.top_k, ge=1)
    """End-to-end graphs: (anchor, class) candidates kept before NMS."""
    nms_max_det: int = _constrained(PREDICT_NMS.max_det, ge=1)
    """End-to-end graphs: detections per image (K of the ``det_*`` outputs)."""
    nms_multi_label: bool = PREDICT_NMS.multi_label
    """End-to-end graphs: every class above ``nms_conf`` is a candidate (mAP's way); false keeps only
    each anchor's best class, one label per box."""

    @property
    def nms_settings(self) -> NMSSettings:
        """The end-to-end graphs' NMS settings."""
        return NMSSettings(
            conf=self.nms_conf,
            iou=self.nms_iou,
            top_k=self.nms_top_k,
            max_det=self.nms_max_det,
            multi_label=self.nms_multi_label,
        )


@dataclass(frozen=True)
class EnginesSection:
    """TensorRT engines built from the ONNX files: FP16 from the FP32 graph, INT8 from the QDQ graph."""

    enabled: bool = True
    """Build engines when TensorRT and a GPU are present (the report says why when they are not)."""
    precisions: list[Precision] = _constrained(factory=lambda: ["fp16", "int8"], nonempty=True, unique=True)
    """One engine per precision."""
    workspace_mb: int = _constrained(4096, ge=1)
    """Builder workspace memory limit, MiB."""
    optimization_level: int = _constrained(3, ge=0, le=5)
    """TensorRT builder optimization level (higher builds slower, may run faster)."""
    timing_cache: str | None = _constrained(None, path=True)
    """Timing cache file read and updated by builds (None = no shared cache)."""
    min_batch: int | None = _constrained(None, ge=1)
    """Optimization profile minimum batch for a dynamic-batch export (None = ``input.batch``)."""
    opt_batch: int | None = _constrained(None, ge=1)
    """Optimization profile batch the kernels are tuned for (None = ``input.batch``)."""
    max_batch: int | None = _constrained(None, ge=1)
    """Optimization profile maximum batch (None = ``input.batch``)."""
    dla_core: int | None = _constrained(None, ge=0)
    """Jetson DLA core to build for (None = GPU)."""
    gpu_fallback: bool = True
    """With ``dla_core``: run layers the DLA cannot on the GPU instead of failing the build."""
    hardware_compatibility: HardwareCompatibility = "none"
    """Let an engine run on GPUs other than the one that built it, at some speed cost."""
    typing: Typing = "auto"
    """weak: the exported graph + FP16/INT8 builder flags (TensorRT 10 only); strong: the graph made
    FP16 by ModelOpt AutoCast first, precisions exactly as typed (TensorRT 11 has nothing else);
    auto: weak on TensorRT 10, strong from 11."""
    verbose: bool = False
    """Verbose TensorRT build log (``<engine>.build.log``; INFO and above otherwise)."""

    def _cross_checks(self) -> list[tuple[str, str]]:
        given = [(name, getattr(self, name)) for name in ("min_batch", "opt_batch", "max_batch")]
        given = [(name, value) for name, value in given if value is not None]
        return [
            (high, f"{value_high} is below {low} {value_low}")
            for (low, value_low), (high, value_high) in zip(given, given[1:], strict=False)
            if value_high < value_low
        ]


@dataclass(frozen=True)
class ValidationSection:
    """The labelled set every artifact's mAP is measured on."""

    data: str | None = _constrained(None, path=True)
    """COCO json or YOLO data yaml; required to quantize."""
    format: Literal["auto", "coco", "yolo"] = "auto"
    """How to read ``data`` (auto = decide from what it is)."""
    protocol: Protocol = "sg"
    """Preprocessing: sg = Deci's COCO protocol (the published numbers), letterbox = Ultralytics-style."""
    conf: float = _constrained(VAL_NMS.conf, gt=0, le=1)
    """Score threshold per (anchor, class) before NMS; Deci's mAP setting."""
    iou: float = _constrained(VAL_NMS.iou, gt=0, le=1)
    """Class-aware NMS IoU threshold."""
    top_k: int = _constrained(VAL_NMS.top_k, ge=1)
    """Candidates kept before NMS."""
    max_det: int = _constrained(VAL_NMS.max_det, ge=1)
    """Detections kept per image after NMS."""
    batch_size: int = _constrained(8, ge=1)
    """Images per validation forward pass."""
    max_images: int | None = _constrained(None, ge=1)
    """Quick check on the first N images in dataset order (None = all); not comparable to full-set mAP."""

    @property
    def nms(self) -> NMSSettings:
        return NMSSettings(conf=self.conf, iou=self.iou, top_k=self.top_k, max_det=self.max_det)


@dataclass(frozen=True)
class BenchmarkSection:
    """Latency measurement of every artifact."""

    warmup: int = _constrained(10, ge=0)
    """Untimed runs before timing (allocations, autotuning, caches)."""
    iterations: int = _constrained(50, ge=1)
    """Timed runs per (artifact, batch size)."""
    batch_sizes: list[int] = _constrained(factory=lambda: [1], ge=1, nonempty=True, unique=True)
    """Batch sizes to time."""
    threads: int | None = _constrained(None, ge=1)
    """CPU threads for CPU backends (None = all cores)."""
    size: int | None = _constrained(None, ge=MAX_STRIDE, le=MAX_INPUT_SIZE, multiple_of=MAX_STRIDE)
    """Input side to time at (None = ``input.size``), so a 320-px model can be timed at 640 too."""
    end_to_end: bool = True
    """Time preprocessing and post-processing as well as the network."""


@dataclass(frozen=True)
class OutputSection:
    """Where results go and when the run fails."""

    dir: str | None = _constrained(None, nonempty=True)
    """Run folder, relative to the current directory (None = ``runs/<name>``)."""
    fail_on_drop: float | None = _constrained(None, ge=0)
    """Fail when INT8 mAP@[.5:.95] is this many mAP POINTS below FP32: 0.5 means 47.5 -> 47.0, i.e.
    0.005 in the fractions the metrics use (None = never fail, only report)."""


@dataclass(frozen=True)
class OpenVINOSection:
    """Report rows on OpenVINO's CPU plugin, when OpenVINO is installed (``nasquant[openvino]``)."""

    enabled: bool = True
    """Validate and time the FP32 graph and the selective INT8 graphs (both flavours) on OpenVINO too,
    at f32 compute."""
    bf16: bool = True
    """Also the FP32 graph at bf16 compute, where the CPU has it (OpenVINO's own default there)."""


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. Paths are already resolved; ``source`` is the file it came from."""

    name: str = _constrained(pattern=(r"[A-Za-z0-9][A-Za-z0-9._-]*", "letters, digits, '.', '_' and '-'"))
    """Names the run folder and the report rows (default: the recipe file's stem)."""
    model: ModelSection
    input: InputSection = field(default_factory=InputSection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    quantization: QuantizationSection = field(default_factory=QuantizationSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    export: ExportSection = field(default_factory=ExportSection)
    engines: EnginesSection = field(default_factory=EnginesSection)
    openvino: OpenVINOSection = field(default_factory=OpenVINOSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    benchmark: BenchmarkSection = field(default_factory=BenchmarkSection)
    output: OutputSection = field(default_factory=OutputSection)
    # Where the recipe came from is provenance, not content: two recipes that say the same thing are
    # equal wherever they were read from, and it is no YAML key.
    source: Path | None = field(default=None, compare=False, metadata={"yaml": False})

    @property
    def output_dir(self) -> Path:
        """``output.dir``, or ``runs/<name>``; relative to the current directory."""
        return Path(self.output.dir) if self.output.dir is not None else Path("runs") / self.name

    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults filled in, as plain YAML-able values (``recipe_from_dict`` inverts it)."""
        return {f.name: _plain(getattr(self, f.name)) for f in _yaml_fields(Recipe)}

    def dump(self, path: str | os.PathLike) -> Path:
        """Write the resolved recipe atomically; a folder gets ``recipe.resolved.yaml`` inside it.


        Paths in it are absolute, so the file loads back to an equal recipe from wherever it is.
        """
        target = Path(path)
        if target.suffix not in (".yaml", ".yml"):
            target = target / RESOLVED_NAME
        origin = f" from {self.source}" if self.source is not None else ""
        header = f"# Resolved{origin}: defaults filled in, ${{VAR}} expanded, --set applied.\n"
        with atomic_path(target) as tmp:
            tmp.write_text(header + yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        return target

    def section_hash(self, *sections: str) -> str:
        """sha256 of the canonical JSON of ``sections`` (all of the recipe when none are named).


        A stage is reused on ``--resume`` when the sections it reads hash the same. Paths are hashed
        as resolved names, not file contents: a checkpoint changed in place needs ``model.sha256``.
        """
        everything = self.to_dict()
        unknown = [s for s in sections if s not in everything]
        if unknown:
            raise ValueError(f"no recipe section {unknown[0]!r}; sections: {', '.join(everything)}")
        chosen = {s: everything[s] for s in sections} if sections else everything
        canonical = json.dumps(chosen, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    def resolve_path(self, value: str) -> str:
        """``value`` made absolute against the recipe file's folder; URLs and aliases are untouched."""
        return _resolve_path(value, self.source.parent if self.source is not None else Path.cwd())

    @property
    def label(self) -> str:
        """How messages name this recipe: its file, relative to the current directory when below it."""
        return _label(self.source)

    def require(self, *keys: str, purpose: str) -> None:
        """Refuse to go on without optional-in-general fields, e.g. ``calibration.data`` to quantize."""
        values = self.to_dict()
        for key in keys:
            node: Any = values
            for part in key.split("."):
                node = node[part]
            if node is None:
                raise NasquantError(
                    f"{self.label}: {key} is required {purpose} "
                    f"(set it in the recipe or with --set {key}=...)"
                )


def _resolve_path(value: str, base: Path) -> str:
    if _URL.match(value):
        return value
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return os.path.normpath(expanded)
    # An alias (yolo_nas_s, yolo_nas_s.pt, coco8.yaml) names a download, unless a file by that name sits
    # right there (the rule nasquant.weights.hub and nasquant.data.hub_datasets apply: a path wins).
    if not (base / value).exists() and _names_a_download(value):
        return value
    return os.path.normpath(base / expanded)


def _names_a_download(value: str) -> bool:
    # Imported here: the hub modules load torch, which reading a recipe for --help must not.
    from nasquant.data.hub_datasets import known_dataset
    from nasquant.weights.hub import checkpoint_alias

    return checkpoint_alias(value) is not None or known_dataset(value) is not None


def _yaml_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in _yaml_fields(type(value))}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _label(source: Path | None) -> str:
    """How messages name a recipe file: relative to the current directory when it is below it."""
    if source is None:
        return "recipe"
    try:
        return str(source.relative_to(Path.cwd()))
    except ValueError:
        return str(source)
