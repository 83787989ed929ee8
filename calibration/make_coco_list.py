"""Choose the COCO calibration images reproducibly and write their file names, one per line.

    python calibration/make_coco_list.py $COCO_ROOT/annotations/instances_train2017.json \
        --count 512 --seed 0 --out calibration/coco_train2017_512.txt

Optional: without a list, ``nasquant quantize`` draws ``calibration.num_images`` images from the
folder by seed (no annotations needed) and writes its own list into the run folder. This script is
for users who want the annotation-based rule: only images with at least one object.

Rule (so anyone with the official annotation file gets the same list): take the images that have at
least one non-crowd box, sort them by image id, draw ``count`` of them with
``numpy.random.default_rng(seed).choice(..., replace=False)``, and write them sorted by id. Use
train2017, never val2017: the INT8 numbers are measured on val2017. Then point the recipe at the list
(``calibration.image_list``, or ``--set calibration.image_list=...``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def choose_images(annotations: dict, *, count: int, seed: int) -> list[str]:
    """File names of ``count`` images with at least one non-crowd box, by the rule above."""
    annotated = {a["image_id"] for a in annotations["annotations"] if not a.get("iscrowd", 0)}
    candidates = sorted(
        (image for image in annotations["images"] if image["id"] in annotated), key=lambda i: i["id"]
    )
    if count > len(candidates):
        raise ValueError(f"asked for {count} images but only {len(candidates)} have boxes")
    picked = np.random.default_rng(seed).choice(len(candidates), size=count, replace=False)
    return [candidates[i]["file_name"] for i in sorted(picked)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("annotations", type=Path, help="instances_train2017.json")
    parser.add_argument("--count", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("coco_train2017_512.txt"))
    args = parser.parse_args(argv)
    names = choose_images(json.loads(args.annotations.read_text()), count=args.count, seed=args.seed)
    header = (
        f"# {args.count} images of {args.annotations.name}, seed {args.seed}, chosen by make_coco_list.py\n"
    )
    # Written beside the target and renamed: an interrupted run never leaves a short list behind.
    partial = args.out.with_name(f".{args.out.name}.part")
    partial.write_text(header + "\n".join(names) + "\n")
    partial.replace(args.out)
    print(f"wrote {len(names)} names to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
