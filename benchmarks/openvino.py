"""nasquant's INT8 graphs on OpenVINO against NNCF's, and why the TensorRT flavour once scored lower there.
Measured on a finished shapes run.

    .venv/bin/python -m benchmarks.openvino [--run runs/shapes_s_int8] [--rounds 40]

The run (``bash benchmarks/shapes_report.sh`` makes one) gives the FP32 graph and the selective INT8
graphs, both flavours, at 320 (validation) and 640 (``bench/``, timing). Rows, each on OpenVINO's CPU
plugin with inference precision pinned to f32 unless labelled:

* **FP32** (f32), and FP32 at bf16 compute where the CPU has it (OpenVINO's own default there);
* **nasquant INT8, CPU flavour** and **TensorRT flavour**, opened as nasquant opens them
  (``ov.convert_model``, the IR export's path);
* the CPU flavour as the run's OpenVINO IR, whose stem is the strided conv again (the ``.onnx``'s
  space-to-depth stem is a fast kernel on ONNX Runtime, an extra SpaceToDepth op on OpenVINO);
* the same two through ``core.read_model``, the path a user who hands OpenVINO the ``.onnx`` takes
  (where the TensorRT flavour scored 83.03), and the TensorRT flavour with one of the CPU flavour's
  rewrites applied at a time: which Q/DQ pattern does that path mishandle?
* **NNCF, stock**: ``nncf.quantize`` with its defaults on the FP32 model, every layer INT8;
* **NNCF, expert**: the box branch (each head's ``reg_convs``/``reg_pred``) and the whole box/score
  decode after the heads in float, as an expert configures it; mixed preset (asymmetric activations).

NNCF calibrates on the run's own calibration images (the same ones ModelOpt saw), at each graph's
input size. Columns: mAP on the whole validation set, Δ vs OpenVINO FP32, agreement with ONNX Runtime
on the same file (mean |Δscore| over 32 validation images), paired speed vs OpenVINO FP32 and
nasquant's CPU flavour (with and without the stem rewrite) vs NNCF expert head to head (640, batch 1,
2 threads), IR weights size.
Writes ``benchmarks/openvino.md`` and ``.json``. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from nasquant import NAS
from nasquant.artifacts import IR_SUFFIX, ArtifactLayout
from nasquant.bench import host_info
from nasquant.bench.latency import paired_speedup
from nasquant.data.calibration import select_calibration_images
from nasquant.data.datasets import iter_batches, load_dataset
from nasquant.eval.validate import validate
from nasquant.export import qdq
from nasquant.export.onnx_files import load_onnx, save_onnx
from nasquant.export.openvino import export_openvino
from nasquant.io import write_json
from nasquant.recipe import load_recipe
from nasquant.report.markdown import host_summary
from nasquant.runtime import OnnxRuntimeBackend, OpenVINOBackend

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: Validation images the agreement with ONNX Runtime is measured on.
AGREEMENT_IMAGES = 32
#: The expert's float layers for NNCF (OpenVINO op-name patterns): the box branch and every decode op
#: after the per-level heads (DFL softmax/projection, anchor offsets, stride scaling, concatenations).
#: Leaving only the DFL projection (``/heads/MatMul*``) in float costs 1.7 points; all of the decode, 0.02.
EXPERT_FLOAT = (r".*/reg_convs/.*", r".*/reg_pred/.*", r"/heads/(?!head\d/).*")
#: The CPU flavour's rewrites, applied one at a time to the TensorRT flavour for the read_model path.
SINGLE_PASSES: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "residual alpha folded": qdq.fold_scalar_multipliers,
    "outputs quantized": qdq.quantize_outputs,
    "unsigned activation grids": qdq.to_uint8_activations,
}


CPU_FLAVOR = "nasquant INT8, CPU flavour"
#: The CPU flavour as the run's OpenVINO IR: its space-to-depth stem (ONNX Runtime's fast path, one
#: more op on OpenVINO) back to the strided conv.
STRIDED_STEM_IR = "nasquant INT8, CPU flavour as its OpenVINO IR (strided stem)"


@dataclass
class Row:
    name: str
    files: dict[str, Path] = field(repr=False)
    """``val`` (320) and ``bench`` (640): ONNX graphs or IR."""
    read_model: bool = False
    """Open the ONNX with ``core.read_model`` (saved as IR first) instead of nasquant's converter path."""
    inference_precision: str = "f32"
    ort_reference: dict[str, Path] | None = field(default=None, repr=False)
    map50_95: float | None = None
    mean_score_diff_vs_ort: float | None = None
    speedup_vs_fp32: float | None = None
    speedup_iqr: tuple[float, float] | None = None
    weights_mb: float | None = None


def _read_model_ir(onnx_path: Path, work: Path) -> Path:
    """The ONNX as ``core.read_model`` reads it, saved as IR (OpenVINOBackend converts ONNX itself)."""
    import openvino as ov

    xml = work / f"read_model.{onnx_path.parent.name}.{onnx_path.stem}.xml"
    ov.save_model(ov.Core().read_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    return xml


def nncf_ir(fp32_onnx: Path, images: list[np.ndarray], xml: Path, *, expert: bool) -> Path:
    import nncf
    import openvino as ov

    model = ov.convert_model(str(fp32_onnx))
    options = {}
    if expert:
        options = {
            "ignored_scope": nncf.IgnoredScope(patterns=list(EXPERT_FLOAT), validate=False),
            "preset": nncf.QuantizationPreset.MIXED,
        }
    quantized = nncf.quantize(model, nncf.Dataset(images), subset_size=len(images), **options)
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    return xml


def _open(row: Row, size: str) -> OpenVINOBackend:
    return OpenVINOBackend(row.files[size], threads=2, inference_precision=row.inference_precision)


def calibration_images(recipe, imgsz: int) -> list[np.ndarray]:
    section = recipe.calibration
    chosen = select_calibration_images(
        load_dataset(section.data, kind=section.format),
        num_images=section.num_images,
        image_list=section.image_list,
    )
    spec = NAS(recipe.resolve_path(recipe.model.checkpoint)).preprocessing(recipe.validation.protocol, imgsz)
    return [
        image[None]
        for batch in iter_batches(chosen, spec, 8, progress="calib images")
        for image in batch.images
    ]


def _rows(run: ArtifactLayout, recipe, work: Path) -> list[Row]:
    graphs = {
        stem_flavor: {"val": run.graph(*stem_flavor), "bench": run.graph(*stem_flavor, bench=True)}
        for stem_flavor in (("model.fp32", None), ("model.int8", "cpu"), ("model.int8", "trt"))
    }
    fp32, cpu, trt = graphs.values()
    missing = [str(p) for files in graphs.values() for p in files.values() if not p.is_file()]
    if missing:
        sys.exit(f"{missing[0]} not found: run `bash benchmarks/shapes_report.sh` first (or pass --run)")
    rows = [Row("OpenVINO FP32 (f32)", fp32, ort_reference=fp32)]
    if _has_bf16():
        rows.append(
            Row("OpenVINO FP32 (bf16 compute, OpenVINO's default here)", fp32, inference_precision="bf16")
        )
    rows += [
        Row(CPU_FLAVOR, cpu, ort_reference=cpu),
        Row("nasquant INT8, TensorRT flavour", trt, ort_reference=trt),
        Row("nasquant INT8, CPU flavour, core.read_model", cpu, read_model=True, ort_reference=cpu),
        Row("nasquant INT8, TensorRT flavour, core.read_model", trt, read_model=True, ort_reference=trt),
    ]
    # The CPU flavour's stem rewrite pays on ONNX Runtime; the IR export undoes it for OpenVINO.
    ir = {size: path.with_suffix(IR_SUFFIX) for size, path in cpu.items()}
    if not all(path.is_file() for path in ir.values()):
        ir = {size: export_openvino(path, work / size / "model.int8.cpu.xml") for size, path in cpu.items()}
    rows.append(Row(STRIDED_STEM_IR, ir, ort_reference=cpu))
    for label, rewrite in SINGLE_PASSES.items():
        files = {}
        for size, path in trt.items():
            files[size] = save_onnx(
                rewrite(load_onnx(path)), work / size / f"trt.{label.replace(' ', '_')}.onnx"
            )
        rows.append(
            Row(f"TensorRT flavour + {label}, core.read_model", files, read_model=True, ort_reference=files)
        )
    for row in rows:
        if row.read_model:
            row.files = {size: _read_model_ir(path, work) for size, path in row.files.items()}
    sizes = {"val": recipe.input.size, "bench": recipe.benchmark.size or recipe.input.size}
    for expert in (False, True):
        label = "expert" if expert else "stock"
        files = {}
        for size, imgsz in sizes.items():
            images = calibration_images(recipe, imgsz)
            files[size] = nncf_ir(fp32[size], images, work / f"nncf.{label}.{size}.xml", expert=expert)
        rows.append(Row(f"NNCF {label}", files))
    return rows


def _has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _measure_accuracy(rows: list[Row], recipe, work: Path) -> None:
    validation = load_dataset(recipe.resolve_path(recipe.validation.data))
    spec = NAS(rows[0].files["val"]).preprocessing()
    sample = np.concatenate([b.images for b in iter_batches(validation, spec, 8)][: AGREEMENT_IMAGES // 8])
    for row in rows:
        print(f"-- {row.name}", flush=True)
        with _open(row, "val") as backend:
            row.map50_95 = validate(backend, validation, spec, batch_size=1, progress=False)["map50_95"]
            if row.ort_reference is not None:
                scores = np.concatenate([backend.run(image[None])[1] for image in sample])
                with OnnxRuntimeBackend(row.ort_reference["val"]) as ort_backend:
                    want = np.concatenate([ort_backend.run(image[None])[1] for image in sample])
                row.mean_score_diff_vs_ort = float(np.abs(scores - want).mean())
        row.weights_mb = _weights_mb(row.files["bench"], work)


def _weights_mb(path: Path, work: Path) -> float:
    if path.suffix == ".xml":
        return path.with_suffix(".bin").stat().st_size / 1e6
    return export_openvino(path, work / "size" / f"{path.stem}.xml").with_suffix(".bin").stat().st_size / 1e6


def _measure_speed(rows: list[Row], rounds: int) -> dict:
    """Paired rounds vs OpenVINO FP32 (f32), then nasquant's CPU flavour (with and without its
    space-to-depth stem) vs NNCF expert head to head."""
    with _open(rows[0], "bench") as fp32:
        for row in rows[1:]:
            if row.read_model:
                continue  # a fidelity probe, not a deployment choice
            with _open(row, "bench") as backend:
                ratio = paired_speedup(fp32, backend, imgsz=640, rounds=rounds)
            row.speedup_vs_fp32, row.speedup_iqr = ratio.median, (ratio.q1, ratio.q3)
    expert = next(r for r in rows if r.name == "NNCF expert")
    head_to_head = {}
    for name in (CPU_FLAVOR, STRIDED_STEM_IR):
        ours = next(r for r in rows if r.name == name)
        with _open(expert, "bench") as reference, _open(ours, "bench") as candidate:
            ratio = paired_speedup(reference, candidate, imgsz=640, rounds=rounds)
        head_to_head[name] = {"median": ratio.median, "q1": ratio.q1, "q3": ratio.q3}
    return head_to_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "shapes_s_int8")
    parser.add_argument("--rounds", type=int, default=40, help="paired rounds per comparison")
    args = parser.parse_args()
    recipe = load_recipe(args.run / "recipe.resolved.yaml")
    with tempfile.TemporaryDirectory(prefix="nasquant-ov-") as folder:
        work = Path(folder)
        for size in ("val", "bench"):
            (work / size).mkdir()
        rows = _rows(ArtifactLayout(args.run), recipe, work)
        _measure_accuracy(rows, recipe, work)
        # Timing last, after every other heavy step, one measurement at a time.
        head_to_head = _measure_speed(rows, args.rounds)
    record = {
        "host": host_info(ort_threads=2),
        "run": str(args.run),
        "rounds": args.rounds,
        "vs_nncf_expert": head_to_head,
        "rows": [
            {k: v for k, v in asdict(row).items() if k not in ("files", "ort_reference")} for row in rows
        ],
    }
    write_json(HERE / "openvino.json", record)
    _write_markdown(record)


def _speed(row: dict) -> str:
    if row["speedup_vs_fp32"] is None:
        return "—"
    q1, q3 = row["speedup_iqr"]
    return f"{row['speedup_vs_fp32']:.2f}× ({q1:.2f}–{q3:.2f})"


def _write_markdown(record: dict) -> None:
    rows = record["rows"]
    fp32_map = rows[0]["map50_95"]
    lines = [
        "# nasquant INT8 on OpenVINO vs NNCF",
        "",
        f"Host: {host_summary(record['host'])}. Shapes fixture (`{record['run']}`): mAP at 320 on the whole "
        f"validation set; mean |Δscore| vs ONNX Runtime running the same file on {AGREEMENT_IMAGES} validation "
        f"images; speed at 640, batch 1, 2 threads, {record['rounds']} paired rounds vs OpenVINO FP32 (f32) "
        "(median, quartiles). `python -m benchmarks.openvino`.",
        "",
        "| OpenVINO model | mAP50-95 | Δ vs FP32 | mean \\|Δscore\\| vs ORT | speedup vs FP32 | weights MB |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        diff = row["mean_score_diff_vs_ort"]
        lines.append(
            f"| {row['name']} | {row['map50_95'] * 100:.2f} | {(row['map50_95'] - fp32_map) * 100:+.2f} | "
            f"{'—' if diff is None else f'{diff:.1e}'} | {_speed(row)} | {row['weights_mb']:.1f} |"
        )
    lines += ["", "Head to head with NNCF expert (paired; above 1 = nasquant faster):", ""]
    for name, h2h in record["vs_nncf_expert"].items():
        lines.append(f"- {name}: {h2h['median']:.2f}× (quartiles {h2h['q1']:.2f}–{h2h['q3']:.2f})")
    lines.append("")
    (HERE / "openvino.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
