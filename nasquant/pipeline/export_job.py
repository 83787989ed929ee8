"""The ``export`` job for INT8 formats: the quantize pipeline's own stages (load → calibrate → select →
export), then the asked format made from the selective INT8 graphs (both ONNX flavours, a TensorRT
engine, or OpenVINO IR), with no validation or benchmark. A second export into the same folder
reuses every stage whose inputs are unchanged."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import get_args

from nasquant.artifacts import end_to_end_path, engine_path, sidecar_path
from nasquant.cuda import tensorrt_unavailable
from nasquant.errors import NasquantError
from nasquant.pipeline.context import Log, RunContext, cached_stage, file_key, stage_key
from nasquant.pipeline.engines import settings_for
from nasquant.pipeline.export import export as export_graphs
from nasquant.pipeline.export import write_openvino_ir
from nasquant.pipeline.finetune import finetune
from nasquant.pipeline.run import calibrated_start, open_run, write_guide
from nasquant.pipeline.select import select
from nasquant.recipe import Recipe, load_recipe, recipe_from_dict
from nasquant.settings import BOX_BRANCH_LAYERS, ExportFormat, NMSSettings

#: the selective INT8 graphs' stem in the run folder (``model.int8.trt.onnx``, ...)
_INT8_STEM = "model.int8"


@dataclass(frozen=True)
class ExportResult:
    run_dir: Path
    files: list[Path]
    """What the asked format produced, the file to ship first."""


def export_recipe(
    recipe: str | os.PathLike | Recipe | None,
    *,
    checkpoint: str,
    calib: str | os.PathLike | None,
    imgsz: int | None,
    dynamic_batch: bool,
    nms: NMSSettings | None,
) -> Recipe:
    """The recipe an INT8 export runs: ``recipe`` (a file or a loaded one) with its model replaced by
    ``checkpoint``, or, from ``calib`` images alone, the defaults with each head's box branch in float
    (:data:`~nasquant.settings.BOX_BRANCH_LAYERS`); the export options given on top."""
    if recipe is None and calib is None:
        raise NasquantError("an INT8 export needs calibration images: give a recipe or --calib DATA")
    if recipe is None:
        base = recipe_from_dict(
            {
                "name": f"{Path(checkpoint).stem}-int8",
                "model": {"checkpoint": os.fspath(checkpoint)},
                "calibration": {"data": os.fspath(Path(calib).absolute())},
                "quantization": {"skip": list(BOX_BRANCH_LAYERS)},
            }
        )
    else:
        base = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        base = replace(base, model=replace(base.model, checkpoint=os.fspath(checkpoint)))
        if calib is not None:
            base = replace(
                base,
                calibration=replace(
                    base.calibration, data=os.fspath(Path(calib).absolute()), image_list=None
                ),
            )
    export = replace(base.export, dynamic_batch=dynamic_batch or base.export.dynamic_batch)
    if nms is not None:
        export = replace(
            export, nms=True, nms_conf=nms.conf, nms_iou=nms.iou, nms_top_k=nms.top_k, nms_max_det=nms.max_det
        )
    size = imgsz if imgsz is not None else base.input.size
    return replace(base, export=export, input=replace(base.input, size=size))


def run_export(
    recipe: Recipe,
    export_format: ExportFormat,
    *,
    output: str | os.PathLike | None = None,
    progress: bool = True,
    log: Log = print,
) -> ExportResult:
    """Calibrate ``recipe``'s model and write ``export_format`` from its selective INT8 graphs into the
    run folder (``output``, else the recipe's); ``export.nms`` makes them end-to-end."""
    if export_format not in get_args(ExportFormat):
        raise NasquantError(
            f"unknown export format {export_format!r}; use {', '.join(get_args(ExportFormat))}"
        )
    if export_format == "engine":
        reason = tensorrt_unavailable()
        if reason is not None:  # said before minutes of calibration, not after
            raise NasquantError(
                f"an INT8 engine is built on the GPU it runs on, and this machine cannot ({reason}); "
                "export --format onnx-int8 and build it there (DEPLOY.md has the lines)"
            )
    # Nothing here is timed or validated: no benchmark-size copies, no quantize-everything baseline.
    recipe = replace(
        recipe,
        benchmark=replace(recipe.benchmark, size=None),
        quantization=replace(recipe.quantization, quantize_all_baseline=False),
    )
    with open_run(
        recipe, output=output, resume=True, progress=progress, log=log, required=("calibration.data",)
    ) as ctx:
        start = calibrated_start(ctx)
        ctx, loaded = start.ctx, start.loaded
        selection = select(ctx, loaded, start.calibrated)
        if selection.recipe is not ctx.recipe:
            ctx = replace(ctx, recipe=selection.recipe)
            ctx.recipe.dump(ctx.run_dir)
        selection = finetune(ctx, loaded, start.calibrated, selection)
        exported = export_graphs(ctx, loaded, selection, start.calibrated)
        write_guide(ctx, loaded, exported)
        graphs = {flavor: ctx.layout.graph(_INT8_STEM, flavor) for flavor in ("trt", "cpu")}
        if ctx.recipe.export.nms:
            graphs = {flavor: end_to_end_path(path) for flavor, path in graphs.items()}
        if export_format == "onnx-int8":
            files = [graphs["trt"], graphs["cpu"]]
        elif export_format == "engine":
            files = _engine(ctx, graphs["trt"])
        else:
            # the CPU flavour: its grids are the ones a CPU's integer kernels take
            files = write_openvino_ir(ctx, [graphs["cpu"]], "openvino int8")
        return ExportResult(ctx.run_dir, files)


def _engine(ctx: RunContext, onnx_path: Path) -> list[Path]:
    from nasquant.export.tensorrt import build_engine

    fields = ctx.fields("engines", "input.batch")
    engine = engine_path(onnx_path, "int8")

    def compute() -> dict:
        build_engine(onnx_path, engine, settings_for(fields, onnx_path, "int8")[0], log=ctx.log)
        return {"engine": str(engine)}

    outputs = [engine, sidecar_path(engine)]
    key = stage_key(file_key(onnx_path), fields.values)
    cached_stage(ctx, "engine int8", key, compute, summary=lambda _: engine.name, outputs=outputs)
    return outputs
