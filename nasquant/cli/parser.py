"""The command line's arguments. Every option that mirrors a recipe field is checked by that field
(type and bounds written once, in :mod:`nasquant.recipe`); NMS defaults come from :mod:`nasquant.settings`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, get_args

from nasquant._version import __version__
from nasquant.cli.ultralytics_args import SYNONYMS, translate_key_values
from nasquant.errors import NasquantError
from nasquant.recipe import (
    BenchmarkSection,
    EnginesSection,
    InputSection,
    OutputSection,
    ValidationSection,
    check_value,
)
from nasquant.settings import DEFAULT_PREDICT_DIR, PREDICT_NMS, VAL_NMS, ExportFormat, NMSSettings


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other nasquant error (argparse prints the
    whole usage block first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _CommandLine(_Parser):
    """The top-level parser: reads Ultralytics-style ``key=value`` arguments as the options they name.
    The subcommands' parsers are plain ``_Parser``: the line is rewritten once, here."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        words = sys.argv[1:] if args is None else args
        return super().parse_known_args(translate_key_values(self, words), namespace)


def _checked(section: type, name: str, parse: Callable[[str], Any] = int) -> Callable[[str], Any]:
    """An argparse ``type`` for an option that mirrors recipe field ``section.name``: parsed, then held
    to that field's type and bounds, so the CLI and recipes refuse the same values with one message."""

    def convert(text: str) -> Any:
        try:
            return check_value(section, name, parse(text))
        except NasquantError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__  # argparse names it in "invalid int value: 'x'"
    return convert


_DEBUG_HELP = "show full tracebacks for errors"
_SIZE = _checked(InputSection, "size")
_CONF = _checked(ValidationSection, "conf", float)
_IOU = _checked(ValidationSection, "iou", float)
_TOP_K = _checked(ValidationSection, "top_k")
_MAX_DET = _checked(ValidationSection, "max_det")
_FAIL_ON_DROP = _checked(OutputSection, "fail_on_drop", float)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="checkpoint (.pt/.pth/.safetensors), folder, URL or alias yolo_nas_s|m|l, "
        "or an exported .onnx/.xml (OpenVINO IR)/.engine (e.g. a run's model.int8.cpu.onnx)",
    )
    parser.add_argument("--variant", help="expected variant (yolo_nas_s|m|l); checked against the weights")
    parser.add_argument("--sha256", help="expected sha256 of the model file (downloads are verified)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present)")


def _add_nms_arguments(
    parser: argparse.ArgumentParser,
    defaults: NMSSettings,
    *,
    conf_note: str = "",
    top_k: bool = True,
    built_in: str = "; an end-to-end graph's built-in value",
) -> None:
    """``--conf --iou [--top-k] --max-det``; each left None when not given, so an end-to-end graph's
    built-in settings apply (``built_in`` says so in the help) and the defaults otherwise."""
    parser.add_argument(
        "--conf",
        type=_CONF,
        default=None,
        help=f"score threshold (default {defaults.conf}{conf_note}{built_in})",
    )
    parser.add_argument(
        "--iou", type=_IOU, default=None, help=f"NMS IoU threshold (default {defaults.iou}{built_in})"
    )
    if top_k:
        parser.add_argument(
            "--top-k",
            type=_TOP_K,
            default=None,
            help=f"candidates kept before NMS (default {defaults.top_k}{built_in})",
        )
    parser.add_argument(
        "--max-det",
        type=_MAX_DET,
        default=None,
        help=f"detections kept per image (default {defaults.max_det}{built_in})",
    )
    parser.add_argument(
        "--multi-label",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="every class above --conf is a candidate (--no-multi-label: one class per box; default "
        f"{'on' if defaults.multi_label else 'off'}{built_in})",
    )


def _add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--imgsz", type=_SIZE, default=None, help="square input size (default: the model's own, else 640)"
    )
    parser.add_argument(
        "--protocol",
        choices=["sg", "letterbox"],
        default=None,
        help="preprocessing: sg = Deci's COCO protocol (default; an ONNX file's recorded one), "
        "letterbox = Ultralytics-style",
    )


def build_parser() -> argparse.ArgumentParser:
    synonyms = ", ".join(f"{key} means {flag}" for key, flag in SYNONYMS.items())
    parser = _CommandLine(
        prog="nasquant",
        description="YOLO-NAS validation, prediction and INT8 deployment.",
        epilog="Options also take the Ultralytics form key=value, mixed freely with --flags: "
        "'nasquant val model=yolo_nas_s.pt data=coco.yaml imgsz=640 max_det=300' is "
        "'nasquant val --model yolo_nas_s.pt --data coco.yaml --imgsz 640 --max-det 300'. "
        f"Switches take True or False (nms=True); of Ultralytics' names, {synonyms}. "
        "--debug may come anywhere on the line.",
    )
    parser.add_argument("--version", action="version", version=f"nasquant {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    info = commands.add_parser(
        "info", help="describe a model: variant, classes, input; params/GFLOPs or precision/float layers"
    )
    _add_model_arguments(info)
    info.add_argument(
        "--imgsz", type=_SIZE, default=640, help="input size for the GFLOPs count (default 640)"
    )
    info.add_argument("--json", metavar="PATH", help="also write the description as JSON")

    val = commands.add_parser(
        "val", help="COCO mAP of a checkpoint or exported file on a dataset (pycocotools)"
    )
    _add_model_arguments(val)
    val.add_argument("--data", required=True, help="COCO json / COCO folder / Ultralytics data yaml")
    _add_preprocess_arguments(val)
    val.add_argument(
        "--batch", type=_checked(ValidationSection, "batch_size"), default=8, help="batch size (default 8)"
    )
    _add_nms_arguments(val, VAL_NMS, conf_note=", Deci's")
    val.add_argument("--json", metavar="PATH", help="write the metrics dict as JSON")

    predict = commands.add_parser("predict", help="detect objects; writes annotated images and a JSON")
    _add_model_arguments(predict)
    predict.add_argument(
        "--source",
        required=True,
        help="image or video file, folder, glob, image URL, stream URL or webcam index (0)",
    )
    predict.add_argument(
        "--out",
        "--output",
        default=DEFAULT_PREDICT_DIR,
        help=f"output folder (default {DEFAULT_PREDICT_DIR}); an existing one gets a sibling: predict2, predict3...",
    )
    predict.add_argument("--exist-ok", action="store_true", help="write into --out even when it exists")
    predict.add_argument("--agnostic", action="store_true", help="class-agnostic NMS (across classes)")
    _add_preprocess_arguments(predict)
    _add_nms_arguments(predict, PREDICT_NMS, top_k=False)

    export = commands.add_parser(
        "export", help="deployment files: ONNX (FP32, INT8, end-to-end), a TensorRT engine, OpenVINO IR"
    )
    _add_model_arguments(export)
    export.add_argument(
        "--format",
        choices=get_args(ExportFormat),
        default="onnx",
        help="onnx (FP32), onnx-int8 (TensorRT + CPU flavours), engine (built here), openvino (IR); default onnx",
    )
    export.add_argument(
        "--int8", action="store_true", help="INT8 engine / IR (calibrates: --recipe or --calib)"
    )
    export.add_argument("--fp16", action="store_true", help="FP16 engine, or IR with half-precision weights")
    export.add_argument("--recipe", help="recipe YAML for INT8: calibration, float layers, export settings")
    export.add_argument(
        "--calib",
        metavar="DATA",
        help="calibration images for INT8 without a recipe (box branch kept in float)",
    )
    export.add_argument(
        "--nms",
        action="store_true",
        help="end-to-end graph: NMS inside, outputs num_dets/det_boxes/det_scores/det_classes",
    )
    _add_nms_arguments(export, PREDICT_NMS, built_in=" (with --nms)")
    export.add_argument(
        "--imgsz", type=_SIZE, default=None, help="square input size (default: the model's own, else 640)"
    )
    export.add_argument("--dynamic-batch", action="store_true", help="dynamic batch dimension")
    export.add_argument(
        "--protocol",
        choices=["sg", "letterbox"],
        default="sg",
        help="preprocessing recorded in the graph (sg)",
    )
    export.add_argument(
        "--output", help="file to write (default: beside the checkpoint); for INT8 the run folder"
    )

    quantize = commands.add_parser(
        "quantize", help="recipe → calibrated INT8 + FP32 ONNX, validated, benchmarked, report"
    )
    _add_recipe_arguments(quantize)
    quantize.add_argument(
        "--fail-on-drop",
        type=_FAIL_ON_DROP,
        default=None,
        metavar="POINTS",
        help="exit 1 when an INT8 row loses more than POINTS mAP50-95 points vs FP32 (e.g. 0.5)",
    )

    sensitivity = commands.add_parser(
        "sensitivity", help="per-layer INT8 sensitivity of a recipe's model: sensitivity.md/.json/.png"
    )
    _add_recipe_arguments(sensitivity)

    bench = commands.add_parser("bench", help="latency of any model file (.pt/.safetensors/.onnx/.engine)")
    bench.add_argument("--model", required=True, help="checkpoint, .onnx or .engine file")
    bench.add_argument(
        "--imgsz", type=_SIZE, default=None, help="input size (default: the model's own, else 640)"
    )
    bench.add_argument(
        "--batch", type=_checked(InputSection, "batch"), default=1, help="batch size (default 1)"
    )
    bench.add_argument(
        "--threads",
        type=_checked(BenchmarkSection, "threads"),
        default=None,
        help="CPU threads (default: all)",
    )
    bench.add_argument(
        "--warmup",
        type=_checked(BenchmarkSection, "warmup"),
        default=10,
        help="untimed runs first (default 10)",
    )
    bench.add_argument(
        "--iterations",
        type=_checked(BenchmarkSection, "iterations"),
        default=50,
        help="timed runs (default 50)",
    )
    bench.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present)")
    bench.add_argument("--json", metavar="PATH", help="write the benchmark row as JSON")

    engine = commands.add_parser("engine", help="TensorRT engines: build one here, or print the trtexec line")
    actions = engine.add_subparsers(dest="engine_command", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="build an engine from an exported ONNX on this GPU")
    _add_engine_arguments(build)
    command = actions.add_parser(
        "command", help="print the trtexec line that builds the engine (for machines without TensorRT Python)"
    )
    _add_engine_arguments(command)
    command.add_argument(
        "--tensorrt-version",
        default="10",
        help="TensorRT on the target machine, e.g. 10.3 (JetPack 6) or 11 (default 10): decides the flags",
    )

    report = commands.add_parser("report", help="show a run's report, or compare several runs")
    report.add_argument("runs", nargs="+", help="run folders (or their report.json)")
    report.add_argument(
        "--fail-on-drop",
        type=_FAIL_ON_DROP,
        default=None,
        metavar="POINTS",
        help="exit 1 when an INT8 row of any run loses more than POINTS mAP50-95 points vs FP32",
    )
    _accept_debug_everywhere(parser)
    return parser


def _accept_debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--debug`` after the subcommand too (``nasquant val ... --debug``). Its default is SUPPRESS
    there: argparse copies a subcommand's defaults over the top level's, which would reset
    ``nasquant --debug val ...`` to False."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.add_argument(
                    "--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP
                )
                _accept_debug_everywhere(command)


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe, its overrides, the run folder and resuming: shared by ``quantize`` and ``sensitivity``."""
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/shapes_s_int8.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set calibration.num_images=128 (repeatable)",
    )
    parser.add_argument("--output", help="run folder (default: output.dir of the recipe, else runs/<name>)")
    parser.add_argument(
        "--resume", action="store_true", help="reuse finished stages whose inputs hash the same"
    )


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = EnginesSection()
    parser.add_argument(
        "model", help="exported ONNX: model.fp32.onnx (FP16/FP32) or model.int8.trt.onnx (INT8)"
    )
    precision = parser.add_mutually_exclusive_group()
    for name in ("fp32", "fp16", "int8"):
        precision.add_argument(
            f"--{name}", dest="precision", action="store_const", const=name, help=f"{name.upper()} engine"
        )
    parser.set_defaults(precision=None)
    parser.add_argument("--output", help="engine path (default: beside the ONNX, e.g. model.int8.engine)")
    for bound in ("min", "opt", "max"):
        parser.add_argument(
            f"--{bound}-batch",
            type=_checked(EnginesSection, f"{bound}_batch"),
            help={
                "min": "profile minimum batch (dynamic-batch graphs only)",
                "opt": "profile batch the kernels are tuned for",
                "max": "profile maximum batch",
            }[bound],
        )
    parser.add_argument(
        "--workspace-mb",
        type=_checked(EnginesSection, "workspace_mb"),
        default=defaults.workspace_mb,
        help="builder workspace, MiB",
    )
    parser.add_argument(
        "--opt-level",
        type=_checked(EnginesSection, "optimization_level"),
        default=defaults.optimization_level,
        help="builder optimization level 0-5",
    )
    parser.add_argument("--timing-cache", help="timing cache file, read and updated (faster rebuilds)")
    parser.add_argument(
        "--typing", choices=["auto", "strong", "weak"], default=defaults.typing, help="network typing (auto)"
    )
    parser.add_argument(
        "--dla-core", type=_checked(EnginesSection, "dla_core"), help="Jetson DLA core to build for"
    )
    parser.add_argument(
        "--no-gpu-fallback",
        action="store_true",
        help="with --dla-core: fail instead of running layers on the GPU",
    )
    parser.add_argument(
        "--hardware-compatibility",
        choices=["none", "ampere_plus", "same_compute_capability"],
        default=defaults.hardware_compatibility,
        help="let the engine run on other GPUs (slower)",
    )
    parser.add_argument("--verbose", action="store_true", help="verbose TensorRT build log")
