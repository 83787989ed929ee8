"""Stage ``engine <precision>``: TensorRT engines from the exported graphs (FP16/FP32 from the FP32
graph, INT8 from the selective QDQ graph), or one skipped report row per precision saying why none
could be built on this machine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nasquant.artifacts import engine_path, sidecar_path
from nasquant.cuda import tensorrt_unavailable
from nasquant.export.engine_plan import EngineSettings, EngineSource, engine_settings
from nasquant.export.tensorrt import build_engine
from nasquant.pipeline.context import RecipeFields, RunContext, cached_stage, file_key, stage_key
from nasquant.pipeline.export import Artifact, Exported
from nasquant.report import ReportRow

READS = ("engines", "input.batch")


@dataclass(frozen=True)
class Engines:
    artifacts: list[Artifact]
    skipped_rows: list[ReportRow]


def engines(ctx: RunContext, exported: Exported) -> Engines:
    fields = ctx.fields(*READS)
    section = fields.engines
    if not section.enabled:
        return Engines([], [])
    reason = tensorrt_unavailable()
    if reason is not None:
        rows = [ReportRow.skipped_row(f"TRT {p.upper()}", "tensorrt", p, reason) for p in section.precisions]
        return Engines([], rows)
    sources: dict[str, Artifact] = {}
    for artifact in exported.artifacts:  # the first FP32 graph, the first (selective) TensorRT-flavour INT8
        if artifact.backend == "onnxruntime" and artifact.flavor in (None, "trt"):
            sources.setdefault(artifact.precision, artifact)
    built = []
    for precision in section.precisions:
        source = sources["int8" if precision == "int8" else "fp32"]
        pairs = {source.path: engine_path(source.path, precision)}
        if source.bench_path != source.path:
            pairs[source.bench_path] = engine_path(source.bench_path, precision)

        def compute(pairs: dict[Path, Path] = pairs, precision: str = precision) -> dict:
            for onnx, engine in pairs.items():
                build_engine(onnx, engine, settings_for(fields, onnx, precision)[0], log=ctx.log)
            return {"engines": [str(p) for p in pairs.values()]}

        cached_stage(
            ctx,
            f"engine {precision}",
            stage_key([file_key(onnx) for onnx in pairs], fields.values, precision),
            compute,
            summary=lambda _, pairs=pairs: ", ".join(p.name for p in pairs.values()),
            outputs=[p for engine in pairs.values() for p in (engine, sidecar_path(engine))],
        )
        engine, *bench = pairs.values()
        built.append(
            Artifact(
                f"TRT {precision.upper()}",
                "tensorrt",
                precision,
                None,
                engine,
                source.skipped_layers if precision == "int8" else [],
                bench[0] if bench else engine,
                source.fp_reason if precision == "int8" else None,
            )
        )
    return Engines(built, [])


def settings_for(
    fields: RecipeFields, onnx_path: Path, precision: str
) -> tuple[EngineSettings, EngineSource]:
    """The recipe's engine settings for one exported graph (its size and batch kind decide the profile)."""
    source = EngineSource.inspect(onnx_path)
    settings = engine_settings(
        fields.engines,
        precision=precision,
        imgsz=source.imgsz,
        batch=source.batch or fields.input.batch,
        dynamic_batch=source.batch is None,
    )
    return settings, source
