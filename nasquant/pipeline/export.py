"""Stage ``export``: the FP32 graph and, per INT8 variant, the TensorRT-flavour and CPU-flavour graphs
(plus copies at the benchmark size when it differs from the model's)."""

from __future__ import annotations

import importlib.util
import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nasquant.artifacts import (
    FLAVORS,
    IR_SUFFIX,
    IR_WEIGHTS_SUFFIX,
    KEY_FLAVOR,
    KEY_FP_LAYERS,
    KEY_RECIPE_HASH,
    end_to_end_path,
)
from nasquant.data.datasets import iter_batches
from nasquant.export import export_onnx, write_cpu_flavor, write_end_to_end
from nasquant.openvino import cpu_has_bf16
from nasquant.pipeline.calibrate import Calibrated
from nasquant.pipeline.context import RecipeFields, RunContext, cached_stage, file_key, stage_key
from nasquant.pipeline.load import Loaded
from nasquant.pipeline.select import Selection
from nasquant.quant import correct_biases

READS = (
    "export",
    "benchmark.size",
    "benchmark.batch_sizes",
    "validation.protocol",
    "quantization.bias_correction",
    "calibration.batch_size",
)
#: With the calibration's key, what an INT8 graph records as the recipe that made it
#: (``nasquant.recipe_hash``); an FP32 graph records model, input and export only.
PROVENANCE = ("model", "input", "quantization", "finetune", "export")


@dataclass(frozen=True)
class Artifact:
    """One model file (or the torch module) that gets validated and benchmarked as a report row."""

    name: str
    backend: str
    precision: str
    flavor: str | None
    path: Path | None
    skipped_layers: list[str]
    bench_path: Path | None = None
    fp_reason: str | None = None
    """Why ``skipped_layers`` are the float layers (recipe list, search result), for the report."""
    inference_precision: str | None = None
    """OpenVINO's compute precision (``f32``, or ``bf16`` for its labelled row); None elsewhere."""

    @property
    def untimed_reason(self) -> str | None:
        """Why the row has no latency, or None when it is timed. A TensorRT-flavour graph on a CPU
        runtime is there for its accuracy (the TensorRT file, checked where TensorRT is absent): it
        computes its integer layers as float Q/DQ round trips there, a latency no deployment sees."""
        if self.flavor == "trt" and self.backend in ("onnxruntime", "openvino"):
            return "the TensorRT-flavour file, validated on a CPU runtime; its latency is the TRT INT8 row's"
        return None


@dataclass(frozen=True)
class Exported:
    artifacts: list[Artifact]
    """The torch module first, then every ONNX graph."""


@dataclass(frozen=True)
class _Variant:
    label: str
    module: torch.nn.Module
    precision: str
    stem: str
    fp_layers: list[str]
    fp_reason: str | None
    upstream: tuple[str, ...]
    """Keys of what the graph is computed from beyond the FP32 model: the calibration, for INT8."""


def export(ctx: RunContext, loaded: Loaded, selection: Selection, calibrated: Calibrated) -> Exported:
    """One cached stage per variant (``export model.fp32``, ``export model.int8``, ...): a new
    calibration or float-layer list re-exports the INT8 graphs and leaves the FP32 graph alone."""
    fields = ctx.fields(*READS)
    bench_size = fields.benchmark.size or loaded.spec.imgsz
    # Graphs have a static input size: timing at another size needs its own copies, same weights
    # (size -> whether the copy goes to the bench folder).
    sizes = {loaded.spec.imgsz: False}
    if bench_size != loaded.spec.imgsz:
        sizes[bench_size] = True
    upstream = (calibrated.key,)
    variants = [
        _Variant("ORT FP32", loaded.detector.model, "fp32", "model.fp32", [], None, ()),
        _Variant(
            "ORT INT8 selective",
            selection.selective,
            "int8",
            "model.int8",
            selection.skipped,
            selection.fp_reason,
            upstream,
        ),
    ]
    # which graphs exist, not what any one of them is: no graph's key holds it
    if ctx.fields("quantization.quantize_all_baseline").quantization.quantize_all_baseline:
        baseline = "quantize-everything baseline"
        variants.append(
            _Variant(
                "ORT INT8 all-layers",
                selection.all_layers,
                "int8",
                "model.int8-all",
                [],
                baseline,
                upstream,
            )
        )
    layout = ctx.layout
    artifacts = [Artifact("torch FP32", "torch", "fp32", None, None, [])]
    for variant in variants:
        for flavor in [None] if variant.precision == "fp32" else list(FLAVORS):
            artifacts.append(
                Artifact(
                    f"{variant.label} (trt flavor)" if flavor == "trt" else variant.label,
                    "onnxruntime",
                    variant.precision,
                    flavor,
                    layout.graph(variant.stem, flavor),
                    variant.fp_layers,
                    layout.graph(variant.stem, flavor, bench=sizes[bench_size]),
                    variant.fp_reason,
                )
            )
        _export_variant(ctx, loaded, selection, calibrated, fields, variant, sizes)
    section = ctx.fields("openvino").openvino
    if not section.enabled or importlib.util.find_spec("openvino") is None:
        return Exported(artifacts)
    # What an OpenVINO deployment ships: the CPU flavour as IR (its stem back to the strided conv).
    write_openvino_ir(
        ctx,
        [layout.graph("model.int8", "cpu", bench=bench) for bench in sizes.values()],
        "openvino model.int8",
    )
    return Exported(artifacts + openvino_artifacts(artifacts, bf16=section.bf16))


def write_openvino_ir(ctx: RunContext, sources: list[Path], stage: str) -> list[Path]:
    """OpenVINO IR beside each ONNX graph (``model.int8.cpu.onnx`` -> ``model.int8.cpu.xml`` + ``.bin``),
    as one cached stage; returns the files written."""
    from nasquant.export.openvino import export_openvino

    targets = [source.with_suffix(IR_SUFFIX) for source in sources]
    outputs = [path for xml in targets for path in (xml, xml.with_suffix(IR_WEIGHTS_SUFFIX))]

    def compute() -> dict:
        # OpenVINO stores a quantized model's float layers in f32 whatever it is asked (its FP16
        # compression skips quantized models): the IR is int8 weights plus the float layers in full.
        return {
            "xml": [str(export_openvino(source, xml)) for source, xml in zip(sources, targets, strict=True)]
        }

    key = stage_key(*(file_key(source) for source in sources))
    summary = ", ".join(
        str(xml.relative_to(ctx.run_dir)) if xml.is_relative_to(ctx.run_dir) else xml.name for xml in targets
    )
    cached_stage(ctx, stage, key, compute, summary=lambda _: summary, outputs=outputs)
    return outputs


def _bias_corrected(
    ctx: RunContext, loaded: Loaded, calibrated: Calibrated, fields: RecipeFields, variant: _Variant
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``variant``'s model with each quantized conv's mean output shift folded into its bias, measured
    on the calibration images (:func:`nasquant.quant.correct_biases`) on each flavour's grids: the
    TensorRT flavour's model, then the CPU flavour's. After the selection, so only the layers that stay
    INT8 are corrected."""
    batch_size = fields.calibration.batch_size
    batches = [b.images for b in iter_batches(calibrated.images, loaded.spec, batch_size)]
    trt = correct_biases(variant.module, batches, progress=ctx.progress)
    cpu = correct_biases(
        variant.module, batches, unsigned_quantizers=trt.nonnegative_quantizers, progress=ctx.progress
    )
    for flavour, corrected in (("TensorRT", trt), ("CPU", cpu)):
        ctx.log(
            f"[export {variant.stem}] bias correction ({flavour} flavour's grids): {len(corrected.shifts)} "
            f"convs, mean |shift| {corrected.mean_abs_shift:.2e} on {len(calibrated.images)} calibration images"
        )
    return trt.model, cpu.model


def openvino_artifacts(artifacts: list[Artifact], *, bf16: bool) -> list[Artifact]:
    """The same models on OpenVINO (``nasquant[openvino]``): FP32 at f32 compute, FP32 at bf16 compute
    (``bf16``) where the CPU has it (OpenVINO's own default there, so a labelled row of its own), and
    the selective INT8 model, both flavours: the CPU flavour as the IR :func:`write_openvino_ir` wrote,
    the TensorRT flavour's ONNX as a check of that file on a second runtime (the quantize-everything
    baseline stays ORT's)."""
    rows = []
    for artifact in artifacts:
        if artifact.backend != "onnxruntime" or artifact.name.startswith("ORT INT8 all-layers"):
            continue
        name = artifact.name.replace("ORT ", "OpenVINO ", 1)
        if artifact.flavor == "cpu":
            artifact = replace(
                artifact,
                path=artifact.path.with_suffix(IR_SUFFIX),
                bench_path=artifact.bench_path.with_suffix(IR_SUFFIX) if artifact.bench_path else None,
            )
        rows.append(replace(artifact, name=name, backend="openvino", inference_precision="f32"))
        if artifact.precision == "fp32" and bf16 and cpu_has_bf16():
            rows.append(
                replace(
                    artifact, name=f"{name} (bf16 compute)", backend="openvino", inference_precision="bf16"
                )
            )
    return rows


def _export_variant(
    ctx: RunContext,
    loaded: Loaded,
    selection: Selection,
    calibrated: Calibrated,
    fields: RecipeFields,
    variant: _Variant,
    sizes: dict[int, bool],
) -> None:
    sections = PROVENANCE if variant.precision == "int8" else ("model", "input", "export")
    # The calibration enters as its key (the images and range settings), not as the recipe's section,
    # whose pinned image_list names the run folder: a copied folder records the same provenance.
    provenance = stage_key(*variant.upstream, selection.recipe.section_hash(*sections))
    key = stage_key(loaded.key, fields.values, variant.fp_layers, provenance)
    int8 = variant.precision == "int8"
    layout = ctx.layout
    outputs = [
        layout.graph(variant.stem, flavor, bench=bench)
        for bench in sizes.values()
        for flavor in (FLAVORS if int8 else [None])
    ]
    section = fields.export
    # End-to-end copies of the graphs at the model's size: what ships, not what is timed.
    end_to_end = [end_to_end_path(path) for path in outputs if section.nms and path.parent == layout.run_dir]
    metadata = {
        # what a consumer needs besides the graph (names, preprocessing) and where the graph came from
        **loaded.detector.onnx_metadata(fields.validation.protocol, loaded.spec.imgsz),
        KEY_RECIPE_HASH: provenance,
        KEY_FLAVOR: "trt" if int8 else "",
        KEY_FP_LAYERS: json.dumps(variant.fp_layers),
    }

    def write(module: torch.nn.Module, path: Path, size: int) -> Path:
        return export_onnx(
            module,
            path,
            imgsz=size,
            batch=fields.benchmark.batch_sizes[0],
            dynamic_batch=section.dynamic_batch,
            opset=section.opset,
            simplify=section.simplify,
            float_weights=section.float_weights,
            metadata=metadata,
        )

    def compute() -> dict:
        trt_module = cpu_module = variant.module
        if int8 and fields.quantization.bias_correction:  # each flavour corrected on its own grids
            trt_module, cpu_module = _bias_corrected(ctx, loaded, calibrated, fields, variant)
        for size, bench in sizes.items():
            target = write(trt_module, layout.graph(variant.stem, "trt" if int8 else None, bench=bench), size)
            if not int8:
                continue
            # The CPU flavour is a rewrite of a TensorRT-flavour graph: one calibration, two graphs.
            cpu = layout.graph(variant.stem, "cpu", bench=bench)
            if cpu_module is trt_module:
                write_cpu_flavor(target, cpu)
                continue
            with tempfile.TemporaryDirectory(prefix=".nasquant-export-", dir=cpu.parent) as folder:
                write_cpu_flavor(write(cpu_module, Path(folder) / target.name, size), cpu)
        for raw in outputs:
            if end_to_end_path(raw) in end_to_end:
                write_end_to_end(raw, end_to_end_path(raw), section.nms_settings)
        return {"files": [str(p) for p in outputs + end_to_end]}

    names = sorted({path.name for path in outputs + end_to_end})
    summary = f"{', '.join(names)} (opset {section.opset})"
    cached_stage(
        ctx, f"export {variant.stem}", key, compute, summary=lambda _: summary, outputs=outputs + end_to_end
    )
