"""``nasquant`` command line: ``info``, ``val``, ``predict``, ``quantize``, ``sensitivity``, ``bench``,
``engine``, ``report``.

Bad input exits with code 2 and one line on stderr; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nasquant._version import __version__
from nasquant.errors import NasquantError
from nasquant.io import write_json
from nasquant.recipe import (
    BenchmarkSection,
    EnginesSection,
    InputSection,
    OutputSection,
    ValidationSection,
    check_value,
)
from nasquant.settings import PREDICT_NMS, VAL_NMS, NMSSettings


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other nasquant error (argparse prints the
    whole usage block first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
        "or an exported .onnx/.engine (e.g. a run's model.int8.cpu.onnx)",
    )
    parser.add_argument("--variant", help="expected variant (yolo_nas_s|m|l); checked against the weights")
    parser.add_argument("--sha256", help="expected sha256 of the model file (downloads are verified)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present)")


def _add_nms_arguments(
    parser: argparse.ArgumentParser, defaults: NMSSettings, *, conf_note: str = "", top_k: bool = True
) -> None:
    parser.add_argument(
        "--conf",
        type=_CONF,
        default=defaults.conf,
        help=f"score threshold (default {defaults.conf}{conf_note})",
    )
    parser.add_argument(
        "--iou", type=_IOU, default=defaults.iou, help=f"NMS IoU threshold (default {defaults.iou})"
    )
    if top_k:
        parser.add_argument(
            "--top-k",
            type=_TOP_K,
            default=defaults.top_k,
            help=f"candidates kept before NMS (default {defaults.top_k})",
        )
    parser.add_argument(
        "--max-det",
        type=_MAX_DET,
        default=defaults.max_det,
        help=f"detections kept per image (default {defaults.max_det})",
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
    parser = _Parser(prog="nasquant", description="YOLO-NAS validation, prediction and INT8 deployment.")
    parser.add_argument("--version", action="version", version=f"nasquant {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    predict.add_argument("--source", required=True, help="image file, folder or glob pattern")
    predict.add_argument("--out", default="runs/predict", help="output folder (default runs/predict)")
    _add_preprocess_arguments(predict)
    _add_nms_arguments(predict, PREDICT_NMS, top_k=False)

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
    return parser


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


def _load(args: argparse.Namespace, *, fuse: bool = True):
    # Imported here so `nasquant --help` answers without loading torch.
    from nasquant.api import NAS

    nas = NAS(args.model, variant=args.variant, sha256=args.sha256, device=args.device)
    # val/predict run the deployment form: re-parameterized, as it will be exported and quantized.
    return nas.fuse() if fuse else nas


def _cmd_info(args: argparse.Namespace) -> None:
    info = _load(args, fuse=False).info(imgsz=args.imgsz)
    names = info["names"]
    shown = ", ".join(names[:10]) + (f", … ({len(names)} total)" if len(names) > 10 else "")
    rows = [
        ("source", info["source"]),
        ("sha256", info["sha256"]),
        ("format", info["format"]),
        ("variant", info["variant"]),
        ("classes", f"{info['num_classes'] or '?'}: {shown or 'no names recorded'}"),
    ]
    if info["format"] == "checkpoint":
        rows += [
            ("parameters", f"{info['parameters']:,} (fused: {info['parameters_fused']:,})"),
            (f"GFLOPs @{info['gflops_imgsz']}", f"{info['gflops']:.2f} (fused; 2 FLOPs per multiply-add)"),
            ("conv layers", f"{info['conv_layers']} (fused)"),
        ]
    else:
        flavor = f" ({info['flavor']} flavour)" if info["flavor"] else ""
        rows += [
            ("precision", f"{info['precision'] or 'not recorded'}{flavor}"),
            ("kept in float", ", ".join(info["fp_layers"]) or "none recorded"),
            ("file size", f"{info['file_mb']} MB"),
        ]
    rows += [
        ("input size", str(info["input_size"])),
        ("preprocessing", str(info["preprocessing"] or "not recorded (Deci COCO default)")),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if args.json:
        write_json(args.json, info)


def _cmd_val(args: argparse.Namespace) -> None:
    metrics = _load(args).val(
        args.data, imgsz=args.imgsz, protocol=args.protocol, batch=args.batch, conf=args.conf, iou=args.iou,
        top_k=args.top_k, max_det=args.max_det,
    )  # fmt: skip
    print(
        f"{metrics['variant']} on {metrics['dataset']} ({metrics['num_images']} images, imgsz {metrics['imgsz']}, "
        f"protocol {metrics['protocol']}, {metrics['backend']} {metrics['precision']} {metrics['device']})"
    )
    summary = ["map50_95", "map50", "map75", "map_small", "map_medium", "map_large"]
    # pycocotools has no value for an area range without ground truth: shown as "n/a".
    print(
        "  ".join(f"{key}=" + ("n/a" if metrics[key] is None else f"{metrics[key]:.4f}") for key in summary)
    )
    per_class = {name: ap for name, ap in metrics["per_class"].items() if ap is not None}
    if per_class:
        width = max(len(name) for name in per_class)
        for name, ap in per_class.items():
            print(f"  {name:<{width}}  AP50-95 {ap:.4f}")
    if args.json:
        print(f"metrics written to {write_json(args.json, metrics)}")


def _cmd_predict(args: argparse.Namespace) -> None:
    nas = _load(args)
    predictions = nas.predict(
        args.source,
        conf=args.conf,
        iou=args.iou,
        imgsz=args.imgsz,
        protocol=args.protocol,
        max_det=args.max_det,
        save_dir=args.out,
        progress=True,
    )
    for prediction in predictions:
        counts: dict[str, int] = {}
        for cls in prediction.class_ids:
            counts[prediction.names[int(cls)]] = counts.get(prediction.names[int(cls)], 0) + 1
        found = ", ".join(f"{n} {name}" for name, n in counts.items()) or "nothing"
        print(f"{prediction.source}: {found}")
    print(f"annotated images and predictions.json written to {args.out}")


def _gate(report: dict, points: float | None, label: str) -> int:
    """The CI mode: print each INT8 row that dropped too far; non-zero when any did."""
    from nasquant.report import check_drop

    failures = [] if points is None else check_drop(report, points)
    for failure in failures:
        print(f"nasquant: accuracy gate ({label}): {failure}", file=sys.stderr)
    return 1 if failures else 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from nasquant.pipeline import run_quantize
    from nasquant.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    report = run_quantize(recipe, output=args.output, resume=args.resume)
    points = args.fail_on_drop if args.fail_on_drop is not None else recipe.output.fail_on_drop
    return _gate(report, points, report["run_dir"])


def _cmd_sensitivity(args: argparse.Namespace) -> int:
    from nasquant.pipeline import run_sensitivity
    from nasquant.recipe import load_recipe

    result = run_sensitivity(load_recipe(args.recipe, args.overrides), output=args.output, resume=args.resume)
    print(f"most sensitive (recovery when kept in FP): {', '.join(result.ranked[:5])}")
    if result.search is not None:
        search = result.search
        print(
            f"search: {len(search['chosen'])} layer(s) in FP, mAP drop {search['drop']:+.4f}, budget met: {search['met']}"
        )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from nasquant.api import NAS
    from nasquant.bench import benchmark, set_threads

    set_threads(args.threads)
    nas = NAS(args.model, device=args.device, threads=args.threads).fuse()
    imgsz = nas.preprocessing(imgsz=args.imgsz).imgsz
    with nas.backend() as backend:
        result = benchmark(
            backend, imgsz=imgsz, batch=args.batch, warmup=args.warmup, iterations=args.iterations
        )
    stats = result.model
    print(
        f"{args.model}: {backend.describe()}, {imgsz}px batch {stats.batch}: p50 {stats.p50_ms:.2f} ms, "
        f"p90 {stats.p90_ms:.2f} ms, p99 {stats.p99_ms:.2f} ms, {stats.images_per_s:.1f} img/s"
    )
    if args.json:
        row = {
            "name": Path(args.model).name,
            "backend": backend.name,
            "precision": backend.precision,
            **result.row_fields(),
        }
        write_json(args.json, row)
    return 0


def _cmd_engine(args: argparse.Namespace) -> int:
    from nasquant.export.tensorrt import (
        EngineSettings,
        EngineSource,
        autocast_command,
        build_engine,
        build_plan,
        default_engine_path,
        trtexec_command,
    )

    source = EngineSource.inspect(args.model)
    precision = args.precision or ("int8" if source.precision == "int8" else "fp16")
    source.check_precision(precision)
    engines = EnginesSection(
        workspace_mb=args.workspace_mb,
        optimization_level=args.opt_level,
        timing_cache=args.timing_cache,
        typing=args.typing,
        dla_core=args.dla_core,
        gpu_fallback=not args.no_gpu_fallback,
        hardware_compatibility=args.hardware_compatibility,
        verbose=args.verbose,
    )
    profile = source.profile(args.min_batch, args.opt_batch, args.max_batch)
    settings = EngineSettings(precision, profile, engines)
    output = Path(args.output) if args.output else default_engine_path(source.path, precision)
    if args.engine_command == "command":
        if build_plan(settings, tensorrt_version=args.tensorrt_version).autocast_fp16:
            print(autocast_command(source.path))
        print(trtexec_command(source.path, output, settings, tensorrt_version=args.tensorrt_version))
        return 0
    sidecar = build_engine(source.path, output, settings)
    print(
        f"{output}: {precision} engine, TensorRT {sidecar.tensorrt_version} on {sidecar.gpu_name} "
        f"(sm {sidecar.compute_capability}); sidecar {output.name}.json"
    )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from nasquant.report import REPORT_MD, load_report, render_comparison, render_markdown

    reports = [(run, load_report(run)) for run in args.runs]
    for run, report in reports:
        # report.json is read from disk and may come from anywhere: a value of the wrong shape deep in
        # it (a host that is a list, ...) makes the file malformed, said in one line.
        try:
            single = render_markdown(report, title=f"{run} ({REPORT_MD})")
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise NasquantError(
                f"{run} is not a readable nasquant report ({type(exc).__name__}: {exc})"
            ) from None
    print(single if len(reports) == 1 else render_comparison(reports))
    return max(_gate(report, args.fail_on_drop, run) for run, report in reports)


COMMANDS = {
    "info": _cmd_info,
    "val": _cmd_val,
    "predict": _cmd_predict,
    "quantize": _cmd_quantize,
    "sensitivity": _cmd_sensitivity,
    "bench": _cmd_bench,
    "engine": _cmd_engine,
    "report": _cmd_report,
}


class _Terminated(BaseException):
    """SIGTERM (what CI runners and ``timeout`` send), raised in the main thread like Ctrl-C's
    KeyboardInterrupt, so the same cleanup runs: every ``atomic_path`` removes its temporary file."""


#: Conventional exit codes of a process ended by SIGINT / SIGTERM (128 + the signal number).
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    def handle(signum: int, frame: object) -> None:
        # A second SIGTERM must not cut the cleanup the first one started.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread (main() called from a worker): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _out_of_memory(exc: BaseException) -> bool:
    # torch reports a failed allocation as a RuntimeError (CPU) or torch.OutOfMemoryError (CUDA);
    # matched by name so the CLI does not import torch to recognise it.
    return (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))
    )


def _close_progress_bars() -> None:
    """End every progress bar still open, so the error line starts on its own line. Bars are context
    managers and close on errors, except one whose constructor was interrupted (a signal right after
    its first draw): it is registered with tqdm but no ``with`` owns it yet."""
    tqdm_module = sys.modules.get("tqdm")  # nothing to close when tqdm was never imported
    if tqdm_module is not None:
        for bar in list(tqdm_module.tqdm._instances):
            bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a usage error (2), --help or --version (0): argparse printed it
        return exc.code if isinstance(exc.code, int) else 2

    def fail(message: str, code: int) -> int:
        if args.debug:
            traceback.print_exc()
        _close_progress_bars()
        print(f"nasquant: {message}", file=sys.stderr)
        return code

    try:
        with _sigterm_raises():
            return COMMANDS[args.command](args) or 0
    except NasquantError as exc:
        return fail(f"error: {exc}", 2)
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED)
    except _Terminated:
        return fail("terminated", EXIT_TERMINATED)
    except OSError as exc:  # disk full, permission denied, ...: the environment, not our bug
        return fail(f"error: {exc}", 1)
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return fail(f"error: out of memory ({first[:200]}); use a smaller batch or input size", 1)


if __name__ == "__main__":
    sys.exit(main())
