"""Stages ``evaluate <artifact>`` (every artifact's mAP on the validation images and its latency, one
report row each) and ``paired <artifact>`` (its speedup over FP32, timed back to back)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from nasquant.bench import benchmark, paired_speedup
from nasquant.bench.latency import CALLS_PER_ROUND
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
    key = stage_key(
        identity, artifact.backend, artifact.inference_precision, fields.values, loaded.spec, images
    )

    def compute() -> dict:
        # A static-batch graph runs only the batch it was exported with.
        static = artifact.backend != "torch" and not fields.export.dynamic_batch
        batch = bench.batch_sizes[0] if static else validation.batch_size
        with open_artifact(artifact, artifact.path, loaded, threads=bench.threads) as backend:
            metrics = validate(
                backend,
                loaded.val_subset,
                loaded.spec,
                nms=validation.nms,
                batch_size=batch,
                progress=ctx.progress,
            )
        accuracy = {"map50_95": metrics["map50_95"], "map50": metrics["map50"]}
        if artifact.untimed_reason is not None:
            return {**accuracy, "extra": {"map75": metrics["map75"], "untimed": artifact.untimed_reason}}
        bench_size = bench.size or loaded.spec.imgsz
        samples = [read_image(p) for p in loaded.val_subset.image_paths[:END_TO_END_IMAGES]]
        with open_artifact(artifact, artifact.bench_path, loaded, threads=bench.threads) as backend:
            timing = benchmark(
                backend,
                imgsz=bench_size,
                batch=bench.batch_sizes[0],
                warmup=bench.warmup,
                iterations=bench.iterations,
                progress=ctx.progress,
                images=samples if bench.end_to_end else None,
                spec=loaded.detector.preprocessing(validation.protocol, bench_size),
            )
        row = timing.row_fields()
        return {
            **accuracy,
            **{k: row[k] for k in ("p50_ms", "p90_ms", "images_per_s")},
            "extra": {"map75": metrics["map75"], **row["extra"]},
        }

    result = cached_stage(
        ctx,
        f"evaluate {artifact.name}",
        key,
        compute,
        summary=lambda r: (
            f"mAP50-95 {r['map50_95']:.4f}, "
            + (f"p50 {r['p50_ms']:.1f} ms @{r['extra']['bench_imgsz']}px" if r.get("p50_ms") else "not timed")
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


def open_artifact(artifact: Artifact, path: Path | None, loaded: Loaded, *, threads: int | None) -> Backend:
    """The backend a report row runs on: torch for the module, OpenVINO at the row's compute precision,
    else the file's own runtime."""
    if artifact.backend == "torch":
        return TorchBackend(loaded.detector.model, device="cpu")
    if artifact.backend == "openvino":
        from nasquant.runtime import OpenVINOBackend

        return OpenVINOBackend(
            path, threads=threads, inference_precision=artifact.inference_precision or "f32"
        )
    return open_backend(path, threads=threads)


def paired(
    ctx: RunContext, loaded: Loaded, artifacts: list[Artifact], rows: list[ReportRow]
) -> list[ReportRow]:
    """Stage ``paired <artifact>``: each reduced-precision graph's speedup over its backend's FP32 graph,
    the two timed back to back in interleaved rounds (about ``benchmark.iterations`` calls each), so a
    slow spell of a shared machine slows both and the ratio the report states is not one of two separate
    runs."""
    fields = ctx.fields("benchmark")
    bench = fields.benchmark
    # each backend's FP32 graph at its default compute (OpenVINO's bf16 row is compared with f32)
    fp32 = {
        a.backend: a
        for a in reversed(artifacts)
        if a.precision == "fp32" and a.bench_path is not None and a.inference_precision in (None, "f32")
    }
    finished = []
    for artifact, row in zip(artifacts, rows, strict=True):
        reference = fp32.get(artifact.backend)
        if reference is None or artifact is reference or not row.ok or artifact.untimed_reason is not None:
            finished.append(row)
            continue
        key = stage_key(
            file_key(reference.bench_path),
            file_key(artifact.bench_path),
            artifact.backend,
            artifact.inference_precision,
            fields.values,
        )

        def compute(reference: Artifact = reference, candidate: Artifact = artifact) -> dict:
            with (
                open_artifact(reference, reference.bench_path, loaded, threads=bench.threads) as fp32_backend,
                open_artifact(candidate, candidate.bench_path, loaded, threads=bench.threads) as backend,
            ):
                ratio = paired_speedup(
                    fp32_backend,
                    backend,
                    imgsz=bench.size or loaded.spec.imgsz,
                    batch=bench.batch_sizes[0],
                    warmup=bench.warmup,
                    # about as many timed calls per model as the benchmark's own iterations
                    rounds=max(1, bench.iterations // (CALLS_PER_ROUND + 1)),
                    progress=ctx.progress,
                )
            return ratio.extra_fields()

        record = cached_stage(
            ctx,
            f"paired {artifact.name}",
            key,
            compute,
            summary=lambda r: (
                f"{r['speedup_paired']:.2f}x vs FP32 (quartiles {r['speedup_paired_q1']:.2f}-"
                f"{r['speedup_paired_q3']:.2f}, {r['speedup_paired_rounds']} rounds)"
            ),
        )
        finished.append(replace(row, extra={**row.extra, **record.result}))
    return finished
