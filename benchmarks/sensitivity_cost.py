"""What the per-layer sensitivity analysis costs, and how it grows: layers, variant, sample size.

    .venv/bin/python benchmarks/sensitivity_cost.py [--imgsz 320] [--threads 2]

The SQNR part of ``nasquant sensitivity`` (two forward passes of the sample per conv) timed for
YOLO-NAS S/M/L at ``--imgsz`` on real COCO images (coco-mini val2017, calibrated on coco-mini
train2017). The networks are built with seeded random weights: the cost of a pass does not depend on
the weights, and COCO checkpoints cannot be downloaded offline. Measured:

* S on evenly spaced subsets of its convs (25, 50, all): growth in layers;
* S, M and L on all their convs: growth with the variant;
* S on 4, 8 and 16 images: the sample size knob.

The mAP half of the analysis (``top_k + 2`` validations, plus one per prefix the search tries) is a
separate cost, proportional to the validation subset; ``shapes_auto/`` records it for S. Writes
``benchmarks/sensitivity_cost.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from nasquant.bench import host_info, set_threads
from nasquant.data.calibration import select_calibration_images
from nasquant.data.datasets import iter_batches, load_dataset
from nasquant.data.preprocess import Preprocess
from nasquant.io import write_json
from nasquant.models.yolo_nas import yolo_nas
from nasquant.quant import calibrate
from nasquant.quant.sensitivity import analyze, conv_layers

HERE = Path(__file__).resolve().parent
COCO_MINI = HERE.parent.parent / "shared" / "data" / "coco-mini"


def evenly_spaced(names: list[str], count: int) -> list[str]:
    picks = np.linspace(0, len(names) - 1, count).round().astype(int)
    return [names[i] for i in picks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-images", type=int, default=32)
    args = parser.parse_args()
    set_threads(args.threads)

    spec = Preprocess.from_protocol("sg", args.imgsz)
    calib = select_calibration_images(load_dataset(COCO_MINI / "train2017"), num_images=args.calib_images)
    calib_batches = [b.images for b in iter_batches(calib, spec, 8)]
    val = load_dataset(COCO_MINI / "annotations" / "instances_val2017.json")
    sample = np.concatenate([b.images for b in iter_batches(val.first(16), spec, 8)])

    # (variant, convs measured: None = all, sample images)
    runs = [
        ("s", 25, 8),
        ("s", 50, 8),
        ("s", None, 8),
        ("m", None, 8),
        ("l", None, 8),
        ("s", None, 4),
        ("s", None, 16),
    ]
    models = {}
    rows = []
    for variant, count, images in runs:
        if variant not in models:
            torch.manual_seed(0)
            fp32 = yolo_nas(f"yolo_nas_{variant}").eval().fuse()
            models[variant] = (fp32, calibrate(fp32, calib_batches, method="max"))
        fp32, calibrated = models[variant]
        convs = conv_layers(calibrated)
        layers = convs if count is None else evenly_spaced(convs, count)
        result = analyze(fp32, calibrated, sample[:images], layers=layers)
        passes = 2 * len(layers)
        rows.append(
            {
                "variant": variant.upper(),
                "convs_total": len(convs),
                "convs_measured": len(layers),
                "images": images,
                "seconds": result.seconds,
                "seconds_per_layer": result.seconds / len(layers),
                "ms_per_pass_image": 1000 * result.seconds / (passes * images),
            }
        )
        print(json.dumps(rows[-1]))

    record = {
        "imgsz": args.imgsz,
        "threads": args.threads,
        "weights": "seeded random (timing only)",
        "sample": "coco-mini val2017",
        "host": host_info(),
        "rows": rows,
    }
    write_json(HERE / "sensitivity_cost.json", record)
    lines = [
        f"# Cost of the per-layer sensitivity analysis (SQNR passes), {args.imgsz} px, {args.threads} threads",
        "",
        "Seeded random weights (a pass costs the same whatever the weights), max calibration on "
        f"{args.calib_images} coco-mini train2017 images, sample from coco-mini val2017, batch 8, CPU.",
        "Each measured conv costs two passes over the sample (only it INT8; all but it INT8), plus two "
        "baseline passes per run. Regenerate: `.venv/bin/python benchmarks/sensitivity_cost.py`.",
        "",
        "| variant | convs (of total) | sample images | wall s | s per conv | ms per pass-image |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['variant']} | {r['convs_measured']} ({r['convs_total']}) | {r['images']} | {r['seconds']:.0f} | "
        f"{r['seconds_per_layer']:.2f} | {r['ms_per_pass_image']:.0f} |"
        for r in rows
    ]
    (HERE / "sensitivity_cost.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
