"""Which layers to keep in floating point: mAP and CPU cost of candidate skip lists on the shapes fixture.

    .venv/bin/python benchmarks/skip_lists.py [--calib-images 256] [--method max] [--bench-imgsz 640]

Calibrates once with the recipe's settings (ModelOpt, all ``--calib-images``), then for each candidate
list validates the fake-quantized torch model on shapes val and times its ONNX Runtime CPU-flavour
INT8 graph (batch 1, ``--threads``). The candidates are hand-made structural lists and the top layers
of the per-layer sensitivity ranking (``benchmarks/shapes_auto/sensitivity.json``), so the two ways of
choosing compete on real mAP. Each candidate is re-validated under ``--resamples`` extra calibrations
on random halves of the calibration set: a candidate whose advantage does not survive another
calibration is noise. Writes ``benchmarks/skip_lists.md`` and ``.json``; the numbers justify (or not)
the skip lists shipped in ``recipes/``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from nasquant import NAS
from nasquant.bench import benchmark_model, host_info, set_threads
from nasquant.data.calibration import select_calibration_images
from nasquant.data.datasets import iter_batches, load_dataset
from nasquant.eval.validate import validate
from nasquant.export import export_onnx, write_cpu_flavor
from nasquant.io import write_json
from nasquant.quant import calibrate, keep_in_float
from nasquant.runtime import OnnxRuntimeBackend, TorchBackend

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
SENSITIVITY = HERE / "shapes_auto" / "sensitivity.json"

STRUCTURAL = {
    "none (quantize everything)": [],
    "stem": ["backbone.stem.*"],
    "prediction convs (previous recipes)": ["heads.head*.cls_pred", "heads.head*.reg_pred"],
    "stem + prediction convs (first recipes)": [
        "backbone.stem.*",
        "heads.head*.cls_pred",
        "heads.head*.reg_pred",
    ],
    "class towers + cls_pred": ["heads.head*.cls_convs.*", "heads.head*.cls_pred"],
    "box towers + reg_pred (shipped)": ["heads.head*.reg_convs.*", "heads.head*.reg_pred"],
    "all heads": ["heads.*"],
    "SPP (context module)": ["backbone.context_module.*"],
}


def candidates() -> dict[str, list[str]]:
    """The structural lists plus the top 1 and top 6 (the box branch's size) by SQNR recovery."""
    ranked = [layer["name"] for layer in json.loads(SENSITIVITY.read_text())["layers"]]
    return {
        **STRUCTURAL,
        "SQNR recovery top 1": ranked[:1],
        "SQNR recovery top 6": ranked[:6],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--method", default="max")
    parser.add_argument("--resamples", type=int, default=2, help="extra calibrations on random halves")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bench-imgsz", type=int, default=640)
    args = parser.parse_args()
    set_threads(args.threads)

    nas = NAS(SHARED / "fixtures" / "yolo_nas_s_shapes.pt").fuse()
    spec = nas.preprocessing()
    val = load_dataset(SHARED / "data" / "shapes" / "val" / "annotations.json")
    calib_set = load_dataset(SHARED / "data" / "shapes" / "calib")
    # The recipe's calibration first (seed 0, all images), then the resamples: seeds 1.. on halves.
    subsets = [(args.calib_images, 0)] + [
        (args.calib_images // 2, seed) for seed in range(1, args.resamples + 1)
    ]
    calibrations = []
    for num_images, seed in subsets:
        calib = select_calibration_images(calib_set, num_images=num_images, seed=seed)
        calibrations.append(
            calibrate(nas.model, [b.images for b in iter_batches(calib, spec, 8)], method=args.method)
        )
    fp32 = validate(TorchBackend(nas.model), val, spec)["map50_95"]
    scratch = Path(tempfile.mkdtemp(prefix="skip_lists_"))

    def cpu_p50_ms(model: object, name: str) -> float:
        graph = export_onnx(model, scratch / f"{name}.onnx", imgsz=args.bench_imgsz)
        if name != "fp32":
            graph = write_cpu_flavor(graph, scratch / f"{name}.cpu.onnx")
        backend = OnnxRuntimeBackend(graph, threads=args.threads)
        return benchmark_model(
            backend, imgsz=args.bench_imgsz, warmup=5, iterations=30, progress=False
        ).p50_ms

    fp32_ms = cpu_p50_ms(nas.model, "fp32")
    rows = []
    for index, (label, patterns) in enumerate(candidates().items()):
        started = time.perf_counter()
        models = [keep_in_float(quantized, patterns) for quantized in calibrations]
        metrics = [validate(TorchBackend(model), val, spec, progress=False) for model, _ in models]
        # Timed once, as the recipe's calibration (the first) builds it: the scales do not change the graph.
        recipe_model, kept = models[0]
        p50_ms = cpu_p50_ms(recipe_model, f"candidate{index}")
        deltas = [100 * (m["map50_95"] - fp32) for m in metrics]
        rows.append(
            {
                "candidate": label,
                "patterns": patterns,
                "fp_layers": len(kept),
                "map50_95": metrics[0]["map50_95"],
                "map50": metrics[0]["map50"],
                "delta_points": deltas[0],
                "resample_delta_points": deltas[1:],
                "mean_delta_points": sum(deltas) / len(deltas),
                "ort_cpu_p50_ms": p50_ms,
                "ort_cpu_ratio": p50_ms / fp32_ms,
            }
        )
        print(
            f"{label}: {', '.join(f'{d:+.2f}' for d in deltas)} points "
            f"({len(kept)} FP layers, {time.perf_counter() - started:.0f} s)"
        )

    record = {
        "fp32_map50_95": fp32,
        "fp32_ort_p50_ms": fp32_ms,
        "bench_imgsz": args.bench_imgsz,
        "method": args.method,
        "calib_images": args.calib_images,
        "resamples": [{"num_images": n, "seed": seed} for n, seed in subsets[1:]],
        "backend": "torch fake-quant (ModelOpt)",
        "host": host_info(),
        "rows": rows,
    }
    write_json(HERE / "skip_lists.json", record)
    resample_header = "".join(f" Δ half {seed} |" for _, seed in subsets[1:])
    lines = [
        "# Skip-list candidates on the shapes fixture (YOLO-NAS-S, 320 px, shapes val, 300 images)",
        "",
        f"FP32 mAP50-95 {100 * fp32:.2f}. INT8: ModelOpt {args.method} calibration on {args.calib_images} "
        "shapes calib images (the recipe's), per-channel weights, evaluated as ModelOpt fake-quant in torch. "
        f"**Δ half N**: the same candidate under a calibration on {args.calib_images // 2} images drawn "
        "with seed N, a measure of how much of a difference is calibration noise; **mean Δ** over all "
        "calibrations.",
        "SQNR candidates: the top layers by recovery in `shapes_auto/sensitivity.json` (16 val images).",
        f"Latency: the candidate's ONNX Runtime CPU-flavour INT8 graph at {args.bench_imgsz} px, batch 1, "
        f"{args.threads} threads, p50 of 30 calls; ORT FP32 p50 {fp32_ms:.1f} ms.",
        "Regenerate: `.venv/bin/python benchmarks/skip_lists.py`.",
        "",
        "| kept in floating point | FP layers | mAP50-95 | mAP50 | Δ vs FP32 (points) |"
        f"{resample_header} mean Δ | ORT CPU p50 ms | × FP32 |",
        "|---|---|---|---|---|" + "---|" * len(subsets[1:]) + "---|---|---|",
    ]
    for r in rows:
        resampled = "".join(f" {d:+.2f} |" for d in r["resample_delta_points"])
        lines.append(
            f"| {r['candidate']} | {r['fp_layers']} | {100 * r['map50_95']:.2f} | {100 * r['map50']:.2f} | "
            f"{r['delta_points']:+.2f} |{resampled} {r['mean_delta_points']:+.2f} | "
            f"{r['ort_cpu_p50_ms']:.1f} | {r['ort_cpu_ratio']:.2f} |"
        )
    (HERE / "skip_lists.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({r["candidate"]: round(r["mean_delta_points"], 2) for r in rows}, indent=1))


if __name__ == "__main__":
    main()
