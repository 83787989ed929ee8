"""One function per ``nasquant`` subcommand; each imports what it needs when it runs, so ``nasquant
--help`` answers without loading torch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nasquant.errors import NasquantError
from nasquant.io import write_json
from nasquant.recipe import (
    EnginesSection,
)


def _load(args: argparse.Namespace, *, fuse: bool = True):
    # Imported here so `nasquant --help` answers without loading torch.
    from nasquant.api import NAS

    nas = NAS(args.model, variant=args.variant, sha256=args.sha256, device=args.device)
    # val/predict run the deployment form: re-parameterized, as it will be exported and quantized.
    return nas.fuse() if fuse else nas


def _cmd_info(args: argparse.Namespace) -> None:
    info = _load(args, fuse=False).info(imgsz=args.imgsz, verbose=True)
    if args.json:
        write_json(args.json, info)


def _cmd_val(args: argparse.Namespace) -> None:
    metrics = _load(args).val(
        args.data, imgsz=args.imgsz, protocol=args.protocol, batch=args.batch, conf=args.conf, iou=args.iou,
        top_k=args.top_k, max_det=args.max_det, multi_label=args.multi_label, verbose=True,
    )  # fmt: skip
    if args.json:
        print(f"metrics written to {write_json(args.json, metrics.results_dict)}")


def _cmd_predict(args: argparse.Namespace) -> None:
    from nasquant.predict import next_free_folder

    folder = next_free_folder(args.out, args.exist_ok)
    results = _load(args).predict(
        args.source,
        conf=args.conf,
        iou=args.iou,
        imgsz=args.imgsz,
        protocol=args.protocol,
        max_det=args.max_det,
        agnostic=args.agnostic or None,
        multi_label=args.multi_label,
        save_dir=folder,
        exist_ok=True,
        stream=True,
    )  # no progress bar: the line per image printed below is the progress
    totals: dict[str, float] = {}
    count = 0
    for result in results:
        count += 1
        frame = "" if result.frame is None else f" frame {result.frame}"
        speed = ", ".join(f"{ms:.1f}ms {step}" for step, ms in result.speed.items())
        print(f"{result.path}{frame}: {result.verbose()} ({speed})")
        for step, ms in result.speed.items():
            totals[step] = totals.get(step, 0.0) + ms
    if count:
        print(
            "Speed: " + ", ".join(f"{ms / count:.1f}ms {step}" for step, ms in totals.items()) + " per image"
        )
    print(f"annotated images and predictions.json written to {folder}")


def _cmd_export(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from nasquant.settings import PREDICT_NMS

    given = {
        name: getattr(args, name)
        for name in ("conf", "iou", "top_k", "max_det", "multi_label")
        if getattr(args, name) is not None
    }
    if given and not args.nms:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise NasquantError(f"{flags} set the NMS built into an end-to-end graph: add --nms")
    int8 = args.int8 or args.format == "onnx-int8"
    path = _load(args, fuse=False).export(
        args.output,
        format=args.format,
        imgsz=args.imgsz,
        protocol=args.protocol,
        dynamic_batch=args.dynamic_batch,
        nms=replace(PREDICT_NMS, **given) if args.nms else False,
        fp16=args.fp16,
        int8=int8,
        recipe=args.recipe,
        calib=args.calib,
    )
    print(
        f"{path}"
        + (f" (run folder {path.parent}: the other flavour, DEPLOY.md, the calibration)" if int8 else "")
    )
    return 0


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
    from nasquant.artifacts import engine_path
    from nasquant.export.engine_plan import (
        EngineSettings,
        EngineSource,
        autocast_command,
        build_plan,
        trtexec_command,
    )
    from nasquant.export.tensorrt import build_engine

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
    output = Path(args.output) if args.output else engine_path(source.path, precision)
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
    from nasquant.artifacts import REPORT_MD
    from nasquant.report import load_report, render_comparison, render_markdown

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
    "export": _cmd_export,
    "quantize": _cmd_quantize,
    "sensitivity": _cmd_sensitivity,
    "bench": _cmd_bench,
    "engine": _cmd_engine,
    "report": _cmd_report,
}
