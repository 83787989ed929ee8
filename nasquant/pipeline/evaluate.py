"""Stage ``evaluate <artifact>``: every artifact's mAP on the validation images and its latency, one
report row each."""

from __future__ import annotations

from nasquant.bench import benchmark
from nasquant.data.preprocess import read_image
from nasquant.eval.validate import validate
from nasquant.pipeline.context import RunContext, cached_stage, file_key, stage_key
from nasquant.pipeline.export import Artifact
from nasquant.pipeline.load import Loaded
from nasquant.report import ReportRow, artifact_size_mb
from nasquant.runtime import Backend, TorchBackend, open_backend

READS = ("validation", "benchmark", "export.dynamic_batch")
#: Real images cycled through for the end-to-end (read-free pre + model + post) timing.
END_TO_END_IMAGES = 8


def evaluate(ctx: RunContext, loaded: Loaded, artifact: Artifact) -> ReportRow:
    fields = ctx.fields(*READS)
    validation, bench = fields.validation, fields.benchmark
    identity = file_key(artifact.path) if artifact.path else stage_key(loaded.weights_key, "torch-fused")
    images = [str(p) for p in loaded.val_subset.image_paths]
    key = stage_key(identity, fields.values, loaded.spec, images)

    def open_artifact(path) -> Backend:
        if artifact.backend == "torch":
            return TorchBackend(loaded.nas.model, device="cpu")
        return open_backend(path, threads=bench.threads)

    def compute() -> dict:
        # A static-batch graph runs only the batch it was exported with.
        static = artifact.backend != "torch" and not fields.export.dynamic_batch
        batch = bench.batch_sizes[0] if static else validation.batch_size
        with open_artifact(artifact.path) as backend:
            metrics = validate(
                backend,
                loaded.val_subset,
                loaded.spec,
                nms=validation.nms,
                batch_size=batch,
                progress=ctx.progress,
            )
        bench_size = bench.size or loaded.spec.imgsz
        samples = [read_image(p) for p in loaded.val_subset.image_paths[:END_TO_END_IMAGES]]
        with open_artifact(artifact.bench_path) as backend:
            timing = benchmark(
                backend,
                imgsz=bench_size,
                batch=bench.batch_sizes[0],
                warmup=bench.warmup,
                iterations=bench.iterations,
                progress=ctx.progress,
                images=samples if bench.end_to_end else None,
                spec=loaded.nas.preprocessing(validation.protocol, bench_size),
            )
        row = timing.row_fields()
        return {
            "map50_95": metrics["map50_95"],
            "map50": metrics["map50"],
            **{k: row[k] for k in ("p50_ms", "p90_ms", "images_per_s")},
            "extra": {"map75": metrics["map75"], **row["extra"]},
        }

    result = cached_stage(
        ctx,
        f"evaluate {artifact.name}",
        key,
        compute,
        summary=lambda r: (
            f"mAP50-95 {r['map50_95']:.4f}, p50 {r['p50_ms']:.1f} ms @{r['extra']['bench_imgsz']}px"
        ),
    ).result
    if artifact.fp_reason:
        result = {**result, "extra": {**result["extra"], "fp_reason": artifact.fp_reason}}
    return ReportRow(
        name=artifact.name,
        backend=artifact.backend,
        precision=artifact.precision,
        flavor=artifact.flavor,
        skipped_layers=artifact.skipped_layers,
        size_mb=artifact_size_mb(artifact.path) if artifact.path else None,
        **result,
    )
