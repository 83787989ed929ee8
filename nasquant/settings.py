"""Settings written once, torch-free: the value types every layer shares and the post-processing
defaults. Recipes (:mod:`nasquant.recipe`), the CLI and the Python API all derive from here, so a
default or an accepted value changes in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from nasquant.checks import is_finite_number, is_int
from nasquant.errors import NasquantError

Variant = Literal["yolo_nas_s", "yolo_nas_m", "yolo_nas_l"]
#: every YOLO-NAS variant nasquant builds, smallest first
VARIANTS: tuple[str, ...] = get_args(Variant)
CalibrationMethod = Literal["max", "percentile", "entropy", "mse"]
#: numeric precision of an artifact or engine
Precision = Literal["fp32", "fp16", "int8"]
#: TensorRT network typing: weak (builder flags), strong (precisions from the graph), auto (by version)
Typing = Literal["auto", "strong", "weak"]
HardwareCompatibility = Literal["none", "ampere_plus", "same_compute_capability"]
#: preprocessing: sg = Deci's COCO protocol, letterbox = Ultralytics-style
Protocol = Literal["sg", "letterbox"]
#: what ``nasquant export`` / ``NAS.export`` write: FP32 (or end-to-end) ONNX, the INT8 ONNX flavours,
#: a TensorRT engine, OpenVINO IR
ExportFormat = Literal["onnx", "onnx-int8", "engine", "openvino"]
#: the layers kept in floating point when no recipe says otherwise: each head's box branch (tower conv
#: and box regression), the list benchmarks/skip_lists.md chose on mAP for YOLO-NAS S/M/L
BOX_BRANCH_LAYERS = ("heads.head*.reg_convs.*", "heads.head*.reg_pred")
#: how an INT8 graph stores the weights of the layers it keeps in floating point
FloatWeights = Literal["float16", "float32"]
#: float16: half the bytes, without rounding for a half-precision checkpoint (each weight stored exactly,
#: a folded one as its float16 weight times its BatchNorm scale), rounded otherwise, which is what
#: TensorRT runs those layers in anyway (every INT8 engine is built with FP16 enabled); float32 keeps
#: a float32 checkpoint's outputs bit-identical on ONNX Runtime and OpenVINO
DEFAULT_FLOAT_WEIGHTS: FloatWeights = "float16"


@dataclass(frozen=True)
class NMSSettings:
    """Post-processing thresholds; the defaults are super-gradients' settings for COCO mAP.

    ``multi_label``: every (anchor, class) pair scoring above ``conf`` is a candidate; otherwise
    only each anchor's best class, kept when it scores at least ``conf``. ``agnostic``: NMS across
    classes (a box suppresses overlapping boxes of any class), not within each class.
    """

    conf: float = 0.01
    iou: float = 0.7
    top_k: int = 1000
    max_det: int = 300
    multi_label: bool = True
    agnostic: bool = False

    def __post_init__(self) -> None:
        # Checked where the settings are made, so the CLI, the API and recipes refuse the same values.
        for name in ("conf", "iou"):
            value = getattr(self, name)
            if not (is_finite_number(value) and 0 < value <= 1):
                raise NasquantError(f"{name} must be a number in (0, 1], got {value!r}")
        for name in ("top_k", "max_det"):
            value = getattr(self, name)
            if not (is_int(value) and value >= 1):
                raise NasquantError(f"{name} must be an integer >= 1, got {value!r}")


#: mAP: super-gradients' validation settings (recipes' ``validation`` section, ``val``)
VAL_NMS = NMSSettings()
#: Interactive use (``predict``, end-to-end graphs and latency): super-gradients' predict confidence,
#: one class per box as Ultralytics' predict (a box labelled twice is noise on a picture)
PREDICT_NMS = NMSSettings(conf=0.25, multi_label=False)

#: where ``predict`` saves annotated images when asked to save without a folder (``predict2``... after)
DEFAULT_PREDICT_DIR = "runs/predict"
