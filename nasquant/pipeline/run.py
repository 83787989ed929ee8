"""The ``quantize`` and ``sensitivity`` jobs: the run folder (locked, cleaned of what an earlier run
left) and the stages in order, each handing its typed result to the next."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from nasquant.artifacts import end_to_end_path
from nasquant.bench import host_info, set_threads
from nasquant.io import describe_holder, remove_stale_parts, run_lock
from nasquant.pipeline.calibrate import Calibrated, calibrate, calibration_images
from nasquant.pipeline.context import Log, RunContext, StageCache
from nasquant.pipeline.engines import engines, settings_for
from nasquant.pipeline.evaluate import evaluate, paired
from nasquant.pipeline.export import Exported
from nasquant.pipeline.export import export as export_graphs
from nasquant.pipeline.finetune import finetune
from nasquant.pipeline.load import Loaded, load
from nasquant.pipeline.select import Sensitivity, select, sensitivity
from nasquant.recipe import Recipe
from nasquant.report import load_report, write_report
from nasquant.report.deploy import render_deploy_guide, write_deploy_guide


@contextlib.contextmanager
def open_run(
    recipe: Recipe,
    *,
    output: str | os.PathLike | None,
    resume: bool,
    progress: bool,
    log: Log,
    required: tuple[str, ...] = ("calibration.data", "validation.data"),
) -> Iterator[RunContext]:
    """The run folder, locked for as long as the context is open: a second run into it is refused in
    one line; what a killed run left (lock, partial files) is taken over and said so; the previous
    report goes before any stage writes, so an interrupted run never leaves a report beside other models.
    ``required``: the recipe fields the job cannot run without."""
    recipe.require(*required, purpose="to quantize")
    run_dir = Path(output) if output else recipe.output_dir
    # Nothing in the folder is touched before the lock is held: another live run may be writing there.
    with run_lock(run_dir) as lock:
        if lock.previous is not None:
            log(
                f"[run] took over {run_dir} from a run that stopped without releasing it ({describe_holder(lock.previous)})"
            )
        ctx = RunContext(recipe, run_dir, StageCache(run_dir, resume=resume), log=log, progress=progress)
        # Temporary files an earlier run left when it was killed (SIGKILL, power loss): never results.
        stale = [path for folder in (run_dir, ctx.layout.bench_dir) for path in remove_stale_parts(folder)]
        if stale:
            log(f"[run] removed {len(stale)} partial file(s) an interrupted run left in {run_dir}")
        old_report = [path for path in ctx.layout.report_files if path.is_file()]
        for path in old_report:
            path.unlink()
        if old_report:
            names = ", ".join(path.name for path in old_report)
            log(f"[run] removed the previous report ({names}): this run writes its own")
        yield ctx


@dataclass(frozen=True)
class CalibratedStart:
    """The start both jobs share: the context (its recipe pinning the calibration draw), the loaded
    model and its calibration."""

    ctx: RunContext
    loaded: Loaded
    calibrated: Calibrated


def calibrated_start(ctx: RunContext) -> CalibratedStart:
    """Load, choose the calibration images and calibrate."""
    ctx.recipe.dump(ctx.run_dir)
    set_threads(ctx.recipe.benchmark.threads)
    loaded = load(ctx)
    images = calibration_images(ctx, loaded.validation)
    if images.recipe is not ctx.recipe:
        ctx = replace(ctx, recipe=images.recipe)
        ctx.recipe.dump(ctx.run_dir)
    return CalibratedStart(ctx, loaded, calibrate(ctx, loaded, images.dataset))


def quantize(ctx: RunContext) -> dict:
    """Every stage, then the report; returns the report dict (``report.json`` plus ``run_dir``)."""
    start = calibrated_start(ctx)
    ctx, loaded, calibrated = start.ctx, start.loaded, start.calibrated
    selection = select(ctx, loaded, calibrated)
    if selection.recipe is not ctx.recipe:
        ctx = replace(ctx, recipe=selection.recipe)
        ctx.recipe.dump(ctx.run_dir)
    selection = finetune(ctx, loaded, calibrated, selection)
    exported = export_graphs(ctx, loaded, selection, calibrated)
    built = engines(ctx, exported)
    artifacts = exported.artifacts + built.artifacts
    rows = paired(ctx, loaded, artifacts, [evaluate(ctx, loaded, artifact) for artifact in artifacts])
    write_guide(ctx, loaded, exported)
    recipe = ctx.recipe
    files = write_report(
        ctx.run_dir,
        recipe=recipe.to_dict(),
        host=host_info(ort_threads=recipe.benchmark.threads),
        rows=rows + built.skipped_rows,
        title=f"{recipe.name}: FP32 vs INT8 ({loaded.detector.variant}, {loaded.validation.name})",
    )
    ctx.log(f"[report] {files['md']}")
    report = load_report(files["json"])
    report["run_dir"] = str(ctx.run_dir)
    return report


def write_guide(ctx: RunContext, loaded: Loaded, exported: Exported) -> None:
    """DEPLOY.md for the run's FP32 and selective INT8 graphs."""
    started = time.perf_counter()
    fields = ctx.fields("engines", "input.batch", "validation.nms", "export")
    section = fields.export
    fp32 = next(a for a in exported.artifacts if a.backend == "onnxruntime" and a.precision == "fp32")
    int8 = next(a for a in exported.artifacts if a.flavor == "trt")
    cpu = next(a for a in exported.artifacts if a.flavor == "cpu")
    graphs = [fp32.path, int8.path, cpu.path]
    settings, source = settings_for(fields, fp32.path, "int8")
    guide = render_deploy_guide(
        fp32_onnx=Path(fp32.path.name),  # the guide sits beside the files it names
        int8_onnx=Path(int8.path.name),
        settings=settings,
        spec=loaded.spec,
        nms=fields.validation.nms,
        class_names=list(loaded.detector.names),
        skipped_layers=int8.skipped_layers,
        fixed_batch=source.batch,
        end_to_end=[Path(end_to_end_path(graph).name) for graph in graphs] if section.nms else None,
        end_to_end_nms=section.nms_settings if section.nms else None,
    )
    ctx.finished("deploy", str(write_deploy_guide(ctx.run_dir, guide)), started)


def run_quantize(
    recipe: Recipe,
    *,
    output: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Log = print,
) -> dict:
    """Run the whole pipeline for ``recipe``; return the report dict (``report.json`` plus ``run_dir``)."""
    with open_run(recipe, output=output, resume=resume, progress=progress, log=log) as ctx:
        return quantize(ctx)


def run_sensitivity(
    recipe: Recipe,
    *,
    output: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Log = print,
) -> Sensitivity:
    """Calibrate ``recipe``'s model and write its per-layer sensitivity evidence into the run folder."""
    with open_run(recipe, output=output, resume=resume, progress=progress, log=log) as ctx:
        start = calibrated_start(ctx)
        return sensitivity(start.ctx, start.loaded, start.calibrated)
