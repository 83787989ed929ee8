"""Which tool should quantize YOLO-NAS? nasquant's default recipe against ONNX Runtime's and NNCF's
quantizers, stock and expertly configured, on the shapes fixture. Measured on a finished shapes run.

    .venv/bin/python -m benchmarks.peers [--run runs/shapes_s_int8] [--rounds 40]

The run (``bash benchmarks/shapes_report.sh`` makes one) gives the FP32 graph and nasquant's INT8
artifacts at 320 (validation) and 640 (``bench/``, timing). Every peer starts from that FP32 graph
and calibrates on the run's own calibration images (the ones ModelOpt saw), at each graph's size:

* **nasquant**, default recipe: the selective INT8 CPU flavour on ONNX Runtime and its OpenVINO IR;
  quantize-everything (the recipe's baseline) on ONNX Runtime;
* **ONNX Runtime** ``quantize_static`` after ``quant_pre_process`` (its documented flow). *Stock*: its
  defaults (QDQ, int8 activations and weights, per-tensor, MinMax). *Expert*: uint8 activations
  (x86's u8s8 kernels), per-channel int8 weights, and the box branch plus the whole box/score decode
  after the per-level heads left in float (``nodes_to_exclude``), with each of its calibrators;
* **NNCF** ``quantize`` + OpenVINO. *Stock*: its defaults. *Expert*: the same float scope
  (``IgnoredScope``), mixed preset (:func:`benchmarks.openvino.nncf_ir`).

ONNX Runtime's calibrators keep every intermediate tensor of every image in memory; they are fed in
chunks (``CalibStridedMinMax``, its documented memory lever: exact for MinMax, histograms merged for
the others). Columns: mAP50-95 on the whole validation set by nasquant's evaluator, Δ vs FP32 on the
same runtime, speed vs that runtime's FP32 in paired rounds (640, batch 1, 2 threads; median and
quartiles), file size. One calibration draw: a draw moves mAP by up to 0.15 points
(``benchmarks/calibrators.md`` has nasquant's mean over three). Writes ``benchmarks/peers.md``,
``.json`` and ``.png``. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from benchmarks.openvino import EXPERT_FLOAT, calibration_images, nncf_ir
from nasquant import NAS
from nasquant.artifacts import INPUT_NAME, IR_SUFFIX, ArtifactLayout
from nasquant.bench import host_info
from nasquant.bench.latency import paired_speedup
from nasquant.data.datasets import load_dataset
from nasquant.eval.validate import validate
from nasquant.io import write_json
from nasquant.recipe import load_recipe
from nasquant.report.markdown import host_summary
from nasquant.report.rows import artifact_size_mb
from nasquant.runtime import OnnxRuntimeBackend, OpenVINOBackend
from nasquant.runtime.base import Backend

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNTIMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
#: Images per ONNX Runtime calibration chunk (its intermediate tensors of a whole chunk stay in memory).
ORT_CALIBRATION_CHUNK = 8
#: ONNX Runtime's calibrators, each raced in the expert configuration.
ORT_EXPERT_CALIBRATORS = {
    "MinMax": CalibrationMethod.MinMax,
    "Percentile": CalibrationMethod.Percentile,
    "Entropy": CalibrationMethod.Entropy,
}


@dataclass
class Row:
    tool: str
    configuration: str
    runtime: str
    files: dict[str, Path] = field(repr=False)
    """``val`` (320) and ``bench`` (640)."""
    map50_95: float | None = None
    speedup_vs_fp32: float | None = None
    speedup_iqr: tuple[float, float] | None = None
    size_mb: float | None = None

    @property
    def label(self) -> str:
        return f"{self.tool}, {self.configuration} ({RUNTIMES[self.runtime]})"


class _ChunkedImages(CalibrationDataReader):
    """Calibration images one at a time, in the ranges ONNX Runtime's strided calibration asks for."""

    def __init__(self, images: list[np.ndarray]) -> None:
        self.images = images
        self.set_range(0, len(images))

    def __len__(self) -> int:
        return len(self.images)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._pending = iter(self.images[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self._pending, None)
        return None if image is None else {INPUT_NAME: image}


def expert_float_nodes(graph_path: Path) -> list[str]:
    """The nodes of ``graph_path`` an expert keeps in float: the box branch and the decode after the
    per-level heads (the same patterns NNCF's ignored scope gets)."""
    patterns = [re.compile(pattern) for pattern in EXPERT_FLOAT]
    names = [node.name for node in onnx.load(str(graph_path), load_external_data=False).graph.node]
    chosen = [name for name in names if any(pattern.fullmatch(name) for pattern in patterns)]
    if not chosen:
        sys.exit(
            f"no node of {graph_path} matches the expert float scope {EXPERT_FLOAT}: were nodes renamed?"
        )
    return chosen


def ort_quantized(fp32: Path, images: list[np.ndarray], out: Path, *, calibrator: str | None) -> Path:
    """``quantize_static`` of ``fp32`` (already through ``quant_pre_process``): its defaults when
    ``calibrator`` is None, else the expert configuration with that calibrator."""
    options: dict = {}
    if calibrator is not None:
        options = {
            "activation_type": QuantType.QUInt8,
            "weight_type": QuantType.QInt8,
            "per_channel": True,
            "nodes_to_exclude": expert_float_nodes(fp32),
            "calibrate_method": ORT_EXPERT_CALIBRATORS[calibrator],
        }
    chunk = math.gcd(len(images), ORT_CALIBRATION_CHUNK)
    quantize_static(
        str(fp32),
        str(out),
        _ChunkedImages(images),
        quant_format=QuantFormat.QDQ,
        extra_options={"CalibStridedMinMax": chunk},
        **options,
    )
    return out


def _rows(run: ArtifactLayout, recipe, work: Path) -> list[Row]:
    fp32 = {"val": run.graph("model.fp32", None), "bench": run.graph("model.fp32", None, bench=True)}

    def artifact(stem: str, suffix: str = ".onnx") -> dict[str, Path]:
        return {
            "val": run.graph(stem, "cpu").with_suffix(suffix),
            "bench": run.graph(stem, "cpu", bench=True).with_suffix(suffix),
        }

    rows = [
        Row("FP32", "reference", "onnxruntime", fp32),
        Row("nasquant", "default recipe (selective)", "onnxruntime", artifact("model.int8")),
        Row("nasquant", "quantize everything", "onnxruntime", artifact("model.int8-all")),
        Row("FP32", "reference", "openvino", fp32),
        Row("nasquant", "default recipe (selective), its IR", "openvino", artifact("model.int8", IR_SUFFIX)),
    ]
    missing = [str(p) for row in rows for p in row.files.values() if not p.is_file()]
    if missing:
        sys.exit(f"{missing[0]} not found: run `bash benchmarks/shapes_report.sh` first (or pass --run)")
    sizes = {"val": recipe.input.size, "bench": recipe.benchmark.size or recipe.input.size}
    images = {size: calibration_images(recipe, imgsz) for size, imgsz in sizes.items()}
    prepared = {}
    for size, path in fp32.items():
        prepared[size] = work / f"fp32.prepared.{size}.onnx"
        quant_pre_process(str(path), str(prepared[size]))
    for calibrator in (None, *ORT_EXPERT_CALIBRATORS):
        configuration = "stock (defaults)" if calibrator is None else f"expert, {calibrator}"
        print(f"-- quantize_static, {configuration}", flush=True)
        files = {
            size: ort_quantized(
                prepared[size], images[size], work / f"ort.{calibrator}.{size}.onnx", calibrator=calibrator
            )
            for size in sizes
        }
        rows.append(Row("ONNX Runtime quantize_static", configuration, "onnxruntime", files))
    for expert in (False, True):
        configuration = "expert" if expert else "stock (defaults)"
        print(f"-- NNCF, {configuration}", flush=True)
        files = {
            size: nncf_ir(fp32[size], images[size], work / f"nncf.{expert}.{size}.xml", expert=expert)
            for size in sizes
        }
        rows.append(Row("NNCF", configuration, "openvino", files))
    return rows


def _open(row: Row, size: str) -> Backend:
    if row.runtime == "openvino":
        return OpenVINOBackend(row.files[size], threads=2)
    return OnnxRuntimeBackend(row.files[size], threads=2)


def _measure_accuracy(rows: list[Row], recipe) -> None:
    validation = load_dataset(recipe.resolve_path(recipe.validation.data))
    spec = NAS(rows[0].files["val"]).preprocessing()
    for row in rows:
        print(f"-- validate {row.label}", flush=True)
        with _open(row, "val") as backend:
            row.map50_95 = validate(backend, validation, spec, batch_size=1, progress=False)["map50_95"]
        row.size_mb = artifact_size_mb(row.files["bench"])


def _measure_speed(rows: list[Row], rounds: int) -> None:
    """Each INT8 row against its runtime's FP32, in paired rounds, one measurement at a time."""
    for runtime in RUNTIMES:
        reference = next(r for r in rows if r.runtime == runtime and r.tool == "FP32")
        with _open(reference, "bench") as fp32:
            for row in rows:
                if row.runtime != runtime or row is reference:
                    continue
                with _open(row, "bench") as backend:
                    ratio = paired_speedup(fp32, backend, imgsz=640, rounds=rounds)
                row.speedup_vs_fp32, row.speedup_iqr = ratio.median, (ratio.q1, ratio.q3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "shapes_s_int8")
    parser.add_argument("--rounds", type=int, default=40, help="paired rounds per comparison")
    parser.add_argument("--output", type=Path, default=HERE / "peers", help="md/json/png path stem")
    args = parser.parse_args()
    recipe = load_recipe(args.run / "recipe.resolved.yaml")
    with tempfile.TemporaryDirectory(prefix="nasquant-peers-") as folder:
        rows = _rows(ArtifactLayout(args.run), recipe, Path(folder))
        _measure_accuracy(rows, recipe)
        _measure_speed(rows, args.rounds)  # last, after every other heavy step
    record = {
        "command": shlex.join(["python", "-m", "benchmarks.peers", *sys.argv[1:]]),
        "host": host_info(ort_threads=2),
        "run": str(args.run),
        "rounds": args.rounds,
        "rows": [
            {**{k: v for k, v in asdict(row).items() if k != "files"}, "label": row.label} for row in rows
        ],
    }
    record["verdict"] = verdict(record["rows"])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output.with_suffix(".json"), record)
    args.output.with_suffix(".md").write_text(_markdown(record))
    _plot(record, args.output.with_suffix(".png"))
    print(f"wrote {args.output.with_suffix('.md')}")


def _delta(rows: list[dict], row: dict) -> float:
    """``row``'s mAP minus its runtime's FP32 mAP, in points."""
    fp32 = next(r for r in rows if r["runtime"] == row["runtime"] and r["tool"] == "FP32")
    return 100 * (row["map50_95"] - fp32["map50_95"])


def verdict(rows: list[dict]) -> dict:
    """nasquant's default recipe against the peers, per runtime, on Δ vs FP32: the margin over the
    best stock peer (positive = ahead) and over the best expert peer (non-negative = not behind)."""
    result = {}
    for runtime in RUNTIMES:
        ours = next(
            (r for r in rows if r["runtime"] == runtime and r["configuration"].startswith("default recipe")),
            None,
        )
        peers = [r for r in rows if r["runtime"] == runtime and r["tool"] not in ("FP32", "nasquant")]
        if ours is None or not peers:
            continue
        best = {
            kind: max((_delta(rows, r) for r in peers if r["configuration"].startswith(kind)), default=None)
            for kind in ("stock", "expert")
        }
        result[runtime] = {
            "nasquant_delta": _delta(rows, ours),
            **{
                f"margin_over_best_{kind}": None if b is None else _delta(rows, ours) - b
                for kind, b in best.items()
            },
        }
    return result


def _markdown(record: dict) -> str:
    rows = record["rows"]
    lines = [
        "# nasquant vs ONNX Runtime's and NNCF's quantizers, shapes fixture",
        "",
        f"Host: {host_summary(record['host'])}. `{record['command'].strip()}` on `{record['run']}`. mAP50-95 "
        "on the whole validation set at 320 by nasquant's evaluator, Δ vs FP32 on the same runtime; speed vs "
        f"that runtime's FP32 at 640, batch 1, 2 threads, {record['rounds']} paired rounds (median, "
        "quartiles); size of the 640 file (an IR: .xml + .bin). Every quantizer calibrated on the same 256 "
        "images; one draw (nasquant's mean over three: `benchmarks/calibrators.md`).",
        "",
        "| tool | configuration | runtime | mAP50-95 | Δ vs FP32 | speedup vs FP32 | MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        speed = "—"
        if row["speedup_vs_fp32"] is not None:
            q1, q3 = row["speedup_iqr"]
            speed = f"{row['speedup_vs_fp32']:.2f}× ({q1:.2f}–{q3:.2f})"
        delta = "—" if row["tool"] == "FP32" else f"{_delta(rows, row):+.2f}"
        lines.append(
            f"| {row['tool']} | {row['configuration']} | {RUNTIMES[row['runtime']]} | "
            f"{100 * row['map50_95']:.2f} | {delta} | {speed} | {row['size_mb']:.1f} |"
        )
    lines += [
        "",
        "nasquant's default recipe, Δ vs FP32 against the best peer of each kind on its runtime:",
        "",
    ]
    for runtime, summary in record["verdict"].items():
        parts = [f"nasquant {summary['nasquant_delta']:+.2f}"]
        for kind in ("stock", "expert"):
            margin = summary[f"margin_over_best_{kind}"]
            if margin is not None:
                standing = "ahead" if margin > 0 else ("level" if margin == 0 else "behind")
                parts.append(f"{standing} of the best {kind} peer by {abs(margin):.2f}")
        lines.append(f"- {RUNTIMES[runtime]}: " + "; ".join(parts))
    lines.append("")
    return "\n".join(lines)


def _plot(record: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in record["rows"] if r["speedup_vs_fp32"] is not None]
    figure = Figure(figsize=(8, 5.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colours = {"nasquant": "tab:green", "ONNX Runtime quantize_static": "tab:blue", "NNCF": "tab:purple"}
    markers = {"onnxruntime": "o", "openvino": "s"}
    for row in rows:
        x, y = row["speedup_vs_fp32"], _delta(record["rows"], row)
        axes.scatter(x, y, s=70, color=colours.get(row["tool"], "tab:gray"), marker=markers[row["runtime"]])
        axes.annotate(row["configuration"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    axes.axhline(0, color="black", linewidth=0.6)
    axes.set_xlabel("speedup vs FP32 on the same runtime (640, batch 1, 2 threads)")
    axes.set_ylabel("Δ mAP50-95 vs FP32 (points)")
    axes.set_yscale("symlog", linthresh=0.5)
    axes.set_title("INT8 quantizers on YOLO-NAS-S (shapes fixture): ○ ONNX Runtime, □ OpenVINO")
    for tool, colour in colours.items():
        axes.scatter([], [], color=colour, label=tool)
    axes.legend(loc="lower left", fontsize=8)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
