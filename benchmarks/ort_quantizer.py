"""Who should write the ONNX Runtime INT8 graph: ONNX Runtime's own quantizer fed ModelOpt's calibrated
ranges, or nasquant's CPU-flavour passes? Measured on a finished shapes run.

    .venv/bin/python -m benchmarks.ort_quantizer [--run runs/shapes_s_int8] [--rounds 60]

The run (``bash benchmarks/shapes_report.sh`` makes one) gives the FP32 graph and ModelOpt's
TensorRT-flavour graph at 320 (validation) and at 640 (``bench/``, timing). Candidates for the CPU
INT8 graph, each built at both sizes:

* **nasquant passes**: the run's ``model.int8.cpu.onnx`` (:func:`nasquant.export.qdq.to_cpu_flavor`);
* the same without the space-to-depth stem: does it still pay? (An integer upsample rewrite was
  measured here the same way, saved nothing and was removed; ``benchmarks/README.md``.)
* **ORT, ModelOpt's ops**: ``onnxruntime.quantization.quantize_static`` on the FP32 graph, told to
  quantize exactly the ops ModelOpt quantized, every tensor ModelOpt has a range for given that range
  through ``TensorQuantOverrides`` (activations uint8 with zero point 128 + ModelOpt's, weights
  int8 per channel with ModelOpt's scales, biases float as in ModelOpt's graph);
* **ORT, + ops between them**: also the ops that feed a quantized op (Relu, MaxPool, Concat, the
  residual ``alpha`` Mul), so ORT can fuse end to end; a Relu output's range starts at 0 (ORT removes
  the Relu into the quantizer, as nasquant's Relu fold does). Tensors ModelOpt has no range for are
  calibrated by ORT itself (MinMax) on the run's own calibration images;
* **ORT, fed nasquant's grids**: as the previous, with every grid nasquant's passes decide (the
  residual ``alpha`` folded into its quantizer, each quantized conv/add output on its readers' grid)
  given as an override too: can ORT do the rewriting once told the grids?

Columns: mAP on the whole validation set; agreement with the TensorRT flavour (ModelOpt's model as
TensorRT runs it) on 32 validation images; how many activation quantizers carry ModelOpt's ranges;
the integer kernels ORT runs after its optimizations; paired speed (rounds of back-to-back calls) vs
ORT FP32 and vs the nasquant passes at 640, batch 1, 2 threads; file size; code lines each route
needs in nasquant. Writes ``benchmarks/ort_quantizer.md`` and ``.json``. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from nasquant import NAS
from nasquant.artifacts import INPUT_NAME, ArtifactLayout
from nasquant.bench import host_info
from nasquant.bench.latency import paired_speedup
from nasquant.data.calibration import select_calibration_images
from nasquant.data.datasets import iter_batches, load_dataset
from nasquant.data.detection import DetectionDataset
from nasquant.errors import NasquantError
from nasquant.export import conv_layouts, graph, qdq
from nasquant.export.graph import constant_values, producer_index, quantizer_axis, rewritten
from nasquant.export.onnx_files import load_onnx, save_onnx
from nasquant.io import atomic_path, write_json
from nasquant.recipe import load_recipe
from nasquant.report.markdown import host_summary
from nasquant.runtime import open_backend
from nasquant.runtime.onnxruntime_backend import optimized_op_types

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: The integer kernels ONNX Runtime's CPU provider fuses Q/DQ patterns into.
INTEGER_KERNELS = ("QLinearConv", "QLinearAdd", "QLinearConcat", "QLinearMul", "QLinearSigmoid", "QGemm")
#: The YOLO-NAS layer the space-to-depth rewrite changes (an ONNX node-name prefix).
STEM = ("/backbone/stem/",)
#: Validation images the agreement with the TensorRT flavour is measured on.
AGREEMENT_IMAGES = 32
#: Anchors whose boxes are compared: a background anchor's box is never drawn and may move freely.
CONFIDENT_SCORE = 0.25


# ---- the bridge: what nasquant would need to hand the CPU flavour to ONNX Runtime's quantizer ----


@dataclass(frozen=True)
class ModelOptRanges:
    """ModelOpt's quantization of a graph, phrased for ``quantize_static``."""

    overrides: dict[str, list[dict]]
    """``TensorQuantOverrides``: FP32-graph tensor name -> ModelOpt's scale and zero point."""
    quantized_ops: list[str]
    """Names of the ops ModelOpt quantized (an input comes from a DequantizeLinear)."""


def modelopt_ranges(
    fp32: onnx.ModelProto, modelopt: onnx.ModelProto, *, relu_from_zero: bool
) -> ModelOptRanges:
    """Read every quantizer of ModelOpt's graph as an override of the FP32 graph's tensor it reads.

    Both graphs come from one export of one network, so their non-Q/DQ nodes share names. Activations
    become uint8 (ModelOpt's signed zero point + 128, the same grid); with ``relu_from_zero`` a Relu
    output's grid starts at 0 instead, so ORT may drop the Relu into the quantizer.
    """
    values = constant_values(modelopt.graph)
    producers = producer_index(modelopt.graph)
    fp32_nodes = {node.name: node for node in fp32.graph.node}
    fp32_producers = producer_index(fp32.graph)
    overrides: dict[str, list[dict]] = {}
    quantized: list[str] = []
    for node in modelopt.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.name not in fp32_nodes:
            continue  # (a node only the quantized graph has: a per-grid copy, which ORT cannot express)
        for index, name in enumerate(node.input):
            dequantize = producers.get(name)
            if dequantize is None or dequantize.op_type != "DequantizeLinear":
                continue
            if not quantized or quantized[-1] != node.name:
                quantized.append(node.name)
            quantize = producers.get(dequantize.input[0])  # None: int8 weights stored as such
            scale, zero = values[dequantize.input[1]], values[dequantize.input[2]]
            tensor = fp32_nodes[node.name].input[index]
            if quantize is None or quantize.input[0] in values:  # a weight: one override per output channel
                overrides[tensor] = [
                    {
                        "axis": quantizer_axis(dequantize),
                        "scale": np.array(channel_scale, np.float32),
                        "zero_point": np.array(0, np.int8),
                        "quant_type": QuantType.QInt8,
                    }
                    for channel_scale in scale.reshape(-1)
                ]
                continue
            source = fp32_producers.get(tensor)
            after_relu = relu_from_zero and source is not None and source.op_type == "Relu"
            shifted = 0 if after_relu else int(zero.reshape(())) + 128
            overrides[tensor] = [
                {
                    "scale": np.array(scale.reshape(()), np.float32),
                    "zero_point": np.array(shifted, np.uint8),
                    "quant_type": QuantType.QUInt8,
                }
            ]
    return ModelOptRanges(overrides, quantized)


def with_feeding_ops(fp32: onnx.ModelProto, ops: list[str]) -> list[str]:
    """``ops`` and every op upstream of one of them: what ORT must quantize to fuse end to end."""
    producers = producer_index(fp32.graph)
    by_name = {node.name: node for node in fp32.graph.node}
    kept, stack = set(ops), [by_name[name] for name in ops]
    while stack:
        for tensor in stack.pop().input:
            source = producers.get(tensor)
            if source is not None and source.name not in kept:
                kept.add(source.name)
                stack.append(source)
    return sorted(kept)


class _Images(CalibrationDataReader):
    """The calibration images, preprocessed as nasquant calibrates, one at a time."""

    def __init__(self, batches: Iterator) -> None:
        self.batches = batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch.images}


def ort_quantized(
    fp32_path: Path, ranges: ModelOptRanges, ops: list[str], images: Callable[[], Iterator], out: Path
) -> Path:
    """``quantize_static`` on ``fp32_path``: QDQ, uint8 activations, int8 per-channel weights, float biases."""
    quantize_static(
        str(fp32_path),
        str(out),
        _Images(images()),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        nodes_to_quantize=ops,
        extra_options={
            "TensorQuantOverrides": ranges.overrides,
            "QuantizeBias": False,
        },
    )
    return out


def _modelopt_grids(modelopt: onnx.ModelProto) -> onnx.ModelProto:
    return modelopt


def _nasquant_grids(modelopt: onnx.ModelProto) -> onnx.ModelProto:
    """ModelOpt's graph with nasquant's grid decisions made (alpha folded into its quantizer, a pair on
    each quantized conv/add output on its readers' grid) but none of the layout rewrites: every tensor
    the CPU flavour quantizes, on the grid the CPU flavour gives it."""
    decided = qdq.CPU_FLAVOR_PASSES[: qdq.CPU_FLAVOR_PASSES.index(qdq._quantize_outputs) + 1]
    return rewritten(modelopt, *decided)


BRIDGE = (ModelOptRanges, modelopt_ranges, with_feeding_ops, _Images, ort_quantized)

# ---- measurements ----


def code_lines(source: str) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    tree = ast.parse(source)
    docstrings: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(
        1
        for number, line in enumerate(source.splitlines(), start=1)
        if line.strip() and not line.strip().startswith("#") and number not in docstrings
    )


@dataclass
class Candidate:
    name: str
    graphs: dict[str, Path]
    """``"val"`` (320) and ``"bench"`` (640) graph."""
    map50_95: float | None = None
    score_max_diff: float | None = None
    score_mean_diff: float | None = None
    box_max_diff_px: float | None = None
    activation_quantizers: int | None = None
    modelopt_ranges: int | None = None
    integer_kernels: int | None = None
    float_convs: int | None = None
    speedup_vs_fp32: float | None = None
    speedup_vs_fp32_iqr: tuple[float, float] | None = None
    speed_vs_passes: float | None = None
    speed_vs_passes_iqr: tuple[float, float] | None = None
    layers: tuple[str, ...] = ()
    """For a row without one rewrite: the layers it changes (node-name prefixes)."""
    layer_ms_with_rewrite: float | None = None
    layer_ms_without: float | None = None
    size_mb: float | None = None


def _outputs(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with open_backend(path, threads=2) as backend:
        runs = [backend.run(images[index : index + 1]) for index in range(len(images))]
    return np.concatenate([run[0] for run in runs]), np.concatenate([run[1] for run in runs])


def _quantizer_provenance(path: Path, overrides: dict[str, list[dict]] | None) -> tuple[int, int]:
    """(activation quantizers, those on ModelOpt's grid). Without ``overrides`` (nasquant's graphs)
    every grid is ModelOpt's by construction."""
    model = onnx.load(str(path), load_external_data=False)
    values = constant_values(model.graph)
    activations = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in values]
    if overrides is None:
        return len(activations), len(activations)
    return len(activations), sum(node.input[0] in overrides for node in activations)


def _layer_kernel_ms(path: Path, layers: tuple[str, ...], work: Path, calls: int = 40) -> float:
    """Milliseconds per call ONNX Runtime's kernels spend in ``layers`` (node-name prefixes), from its
    profiler at 640, batch 1, 2 threads: the median over calls of each node, summed. Finer than a
    whole-model ratio for a rewrite that moves one layer."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.enable_profiling = True
    options.profile_file_prefix = str(work / path.stem)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)
    for _ in range(calls):
        session.run(None, {INPUT_NAME: images})
    events = json.loads(Path(session.end_profiling()).read_text())
    per_node: dict[str, list[float]] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time") and name.startswith(layers):
            per_node.setdefault(name, []).append(event["dur"])
    # the first calls of a session are warm-up
    return sum(float(np.median(durations[calls // 4 :])) for durations in per_node.values()) / 1000


def _candidates(
    work: Path, fp32: dict[str, Path], trt: dict[str, Path], passes: dict[str, Path], chosen: DetectionDataset
) -> tuple[list[Candidate], dict[str, dict[str, list[dict]]]]:
    """Every CPU INT8 graph compared, built into ``work``, and the overrides each ORT graph was given."""
    candidates = [Candidate("nasquant passes", passes)]
    kept = [
        step for step in qdq.CPU_FLAVOR_PASSES if step is not conv_layouts.apply_space_to_depth_input_convs
    ]
    graphs = {
        size: save_onnx(rewritten(load_onnx(path), *kept), work / f"no_space_to_depth.{size}.onnx")
        for size, path in trt.items()
    }
    candidates.append(Candidate("nasquant passes − space-to-depth stem", graphs, layers=STEM))
    overrides: dict[str, dict[str, list[dict]]] = {}
    for label, grids, feeding in (
        ("ORT quantize_static, ModelOpt's ops", _modelopt_grids, False),
        ("ORT quantize_static, + ops between them", _modelopt_grids, True),
        ("ORT quantize_static, fed nasquant's grids", _nasquant_grids, True),
    ):
        graphs = {}
        for size in ("val", "bench"):
            fp32_model = load_onnx(fp32[size])
            ranges = modelopt_ranges(fp32_model, grids(load_onnx(trt[size])), relu_from_zero=feeding)
            ops = with_feeding_ops(fp32_model, ranges.quantized_ops) if feeding else ranges.quantized_ops
            spec = NAS(fp32[size]).preprocessing()
            graphs[size] = ort_quantized(
                fp32[size],
                ranges,
                ops,
                lambda spec=spec: iter_batches(chosen, spec, 1, progress=f"ORT calibration {spec.imgsz}"),
                work / f"ort_{len(candidates)}.{size}.onnx",
            )
            overrides[label] = ranges.overrides  # the val graph's names are the bench graph's
        candidates.append(Candidate(label, graphs))
    return candidates, overrides


def _measure_accuracy(
    candidates: list[Candidate],
    overrides: dict[str, dict[str, list[dict]]],
    fp32: dict[str, Path],
    trt: dict[str, Path],
    validation: str,
) -> tuple[float, float]:
    """Fill each candidate's mAP, agreement, provenance, kernels and size; return FP32's and the
    TensorRT flavour's mAP."""
    val_spec = NAS(fp32["val"]).preprocessing()
    sample = load_dataset(validation)
    sample_images = np.concatenate(
        [b.images for b in iter_batches(sample, val_spec, 8)][: AGREEMENT_IMAGES // 8]
    )
    reference_boxes, reference_scores = _outputs(trt["val"], sample_images)
    confident = reference_scores.max(axis=-1) >= CONFIDENT_SCORE
    for candidate in candidates:
        print(f"-- {candidate.name}", flush=True)
        candidate.map50_95 = NAS(candidate.graphs["val"]).val(validation, progress=False)["map50_95"]
        boxes, scores = _outputs(candidate.graphs["val"], sample_images)
        candidate.score_max_diff = float(np.abs(scores - reference_scores).max())
        candidate.score_mean_diff = float(np.abs(scores - reference_scores).mean())
        candidate.box_max_diff_px = float(np.abs(boxes - reference_boxes)[confident].max())
        candidate.activation_quantizers, candidate.modelopt_ranges = _quantizer_provenance(
            candidate.graphs["val"], overrides.get(candidate.name)
        )
        kernels = optimized_op_types(candidate.graphs["bench"], threads=2)
        candidate.integer_kernels = sum(kernels[op] for op in INTEGER_KERNELS)
        candidate.float_convs = kernels["Conv"] + kernels["ConvTranspose"] + kernels["FusedConv"]
        candidate.size_mb = candidate.graphs["bench"].stat().st_size / 1e6
    fp32_map = NAS(fp32["val"]).val(validation, progress=False)["map50_95"]
    trt_map = NAS(trt["val"]).val(validation, progress=False)["map50_95"]
    return fp32_map, trt_map


def _measure_speed(
    candidates: list[Candidate], fp32: dict[str, Path], passes: dict[str, Path], rounds: int, work: Path
) -> None:
    """Per-layer kernel time where a rewrite was left out, then paired speed vs FP32 and vs the passes."""
    for candidate in candidates:
        if candidate.layers:
            candidate.layer_ms_with_rewrite = _layer_kernel_ms(passes["bench"], candidate.layers, work)
            candidate.layer_ms_without = _layer_kernel_ms(candidate.graphs["bench"], candidate.layers, work)
    with (
        open_backend(fp32["bench"], threads=2) as fp32_backend,
        open_backend(passes["bench"], threads=2) as ours,
    ):
        for candidate in candidates:
            with open_backend(candidate.graphs["bench"], threads=2) as backend:
                vs_fp32 = paired_speedup(fp32_backend, backend, imgsz=640, rounds=rounds)
                candidate.speedup_vs_fp32, candidate.speedup_vs_fp32_iqr = (
                    vs_fp32.median,
                    (vs_fp32.q1, vs_fp32.q3),
                )
                if candidate.graphs["bench"] != passes["bench"]:
                    vs_ours = paired_speedup(ours, backend, imgsz=640, rounds=rounds)
                    candidate.speed_vs_passes, candidate.speed_vs_passes_iqr = (
                        vs_ours.median,
                        (vs_ours.q1, vs_ours.q3),
                    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "shapes_s_int8")
    parser.add_argument("--rounds", type=int, default=60, help="paired rounds per comparison")
    args = parser.parse_args()
    run = ArtifactLayout(args.run)
    fp32 = {"val": run.graph("model.fp32"), "bench": run.graph("model.fp32", bench=True)}
    trt = {"val": run.graph("model.int8", "trt"), "bench": run.graph("model.int8", "trt", bench=True)}
    passes = {"val": run.graph("model.int8", "cpu"), "bench": run.graph("model.int8", "cpu", bench=True)}
    missing = [str(p) for p in (*fp32.values(), *trt.values(), *passes.values()) if not p.is_file()]
    if missing:
        sys.exit(f"{missing[0]} not found: run `bash benchmarks/shapes_report.sh` first (or pass --run)")
    recipe = load_recipe(args.run / "recipe.resolved.yaml")
    section = recipe.calibration
    chosen = select_calibration_images(
        load_dataset(section.data, kind=section.format),
        num_images=section.num_images,
        image_list=section.image_list,
    )
    validation = recipe.resolve_path(recipe.validation.data)

    with tempfile.TemporaryDirectory(prefix="nasquant-ortq-") as folder:
        work = Path(folder)
        candidates, overrides = _candidates(work, fp32, trt, passes, chosen)
        fp32_map, trt_map = _measure_accuracy(candidates, overrides, fp32, trt, validation)
        # Timing last, after every other heavy step, one measurement at a time.
        _measure_speed(candidates, fp32, passes, args.rounds, work)

    own_lines = sum(code_lines(inspect.getsource(module)) for module in (qdq, conv_layouts, graph))
    bridge_lines = sum(code_lines(inspect.getsource(part)) for part in BRIDGE)
    record = {
        "host": host_info(ort_threads=2),
        "run": str(args.run),
        "rounds": args.rounds,
        "calibration_images": len(chosen),
        "fp32_map50_95": fp32_map,
        "trt_flavor_map50_95": trt_map,
        "code_lines": {
            "nasquant passes (export/qdq.py, conv_layouts.py, graph.py)": own_lines,
            "ORT bridge": bridge_lines,
        },
        "candidates": [
            {key: value for key, value in asdict(c).items() if key != "graphs"} for c in candidates
        ],
    }
    write_json(HERE / "ort_quantizer.json", record)
    _write_markdown(record)


def _ratio(value: float | None, iqr: tuple[float, float] | None) -> str:
    return "—" if value is None else f"{value:.2f}× ({iqr[0]:.2f}–{iqr[1]:.2f})"


def _layer_ms(row: dict) -> str:
    if row["layer_ms_with_rewrite"] is None:
        return "—"
    return f"{row['layer_ms_with_rewrite']:.2f} / {row['layer_ms_without']:.2f}"


def _write_markdown(record: dict) -> None:
    fp32_map = record["fp32_map50_95"]
    lines = [
        "# ONNX Runtime's quantizer vs nasquant's CPU-flavour passes",
        "",
        f"Host: {host_summary(record['host'])}. Shapes fixture (`{record['run']}`): mAP at 320 on the whole "
        f"validation set (FP32 {fp32_map * 100:.2f}, TensorRT flavour {record['trt_flavor_map50_95'] * 100:.2f}); "
        f"agreement with the TensorRT flavour on {AGREEMENT_IMAGES} validation images; speed at 640, batch 1, "
        f"2 threads, {record['rounds']} paired rounds (median, quartiles). ORT calibrates the tensors ModelOpt has "
        f"no range for itself (MinMax) on the run's {record['calibration_images']} calibration images. "
        "`python -m benchmarks.ort_quantizer`.",
        "",
        "| CPU INT8 graph | mAP50-95 | Δ vs FP32 | max / mean \\|Δscore\\| vs TRT flavour | max \\|Δbox\\| px (score ≥ 0.25) | "
        "activation quantizers (ModelOpt's grid) | integer kernels / float convs | speedup vs FP32 | "
        "speed vs nasquant passes | the rewritten layers' kernels, ms: with / without the rewrite | size MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in record["candidates"]:
        lines.append(
            f"| {c['name']} | {c['map50_95'] * 100:.2f} | {(c['map50_95'] - fp32_map) * 100:+.2f} | "
            f"{c['score_max_diff']:.4f} / {c['score_mean_diff']:.2e} | {c['box_max_diff_px']:.2f} | "
            f"{c['activation_quantizers']} ({c['modelopt_ranges']}) | {c['integer_kernels']} / {c['float_convs']} | "
            f"{_ratio(c['speedup_vs_fp32'], c['speedup_vs_fp32_iqr'])} | "
            f"{_ratio(c['speed_vs_passes'], c['speed_vs_passes_iqr'])} | {_layer_ms(c)} | {c['size_mb']:.1f} |"
        )
    code = record["code_lines"]
    lines += [
        "",
        "Speed columns: time of the reference / time of the row, so above 1 is faster. Code lines (no blank, "
        "comment or docstring lines): " + ", ".join(f"{name} {count}" for name, count in code.items()) + ".",
    ]
    with atomic_path(HERE / "ort_quantizer.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    try:
        main()
    except NasquantError as error:
        sys.exit(str(error))
