"""``calibration/make_coco_list.py``: the annotation-based list, read back by ``calibration.image_list``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from nasquant.data.calibration import read_image_list
from tests.shared import shared_path

SCRIPT = Path(__file__).resolve().parent.parent / "calibration" / "make_coco_list.py"


def _script():
    spec = importlib.util.spec_from_file_location("make_coco_list", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_list_follows_its_documented_rule_and_reads_back(tmp_path: Path, capsys) -> None:
    # coco-mini's val annotations stand in for train2017's (the same format), with one image left
    # without boxes and one with only a crowd box: the rule must drop both.
    coco = json.loads(shared_path("data", "coco-mini", "annotations", "instances_val2017.json").read_text())
    no_boxes, crowd_only = coco["images"][3]["id"], coco["images"][9]["id"]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != no_boxes]
    for a in coco["annotations"]:
        a["iscrowd"] = 1 if a["image_id"] == crowd_only else a.get("iscrowd", 0)
    annotations = tmp_path / "instances_train2017.json"
    annotations.write_text(json.dumps(coco))
    candidates = sorted(
        (i for i in coco["images"] if i["id"] not in (no_boxes, crowd_only)), key=lambda i: i["id"]
    )
    picked = np.random.default_rng(5).choice(len(candidates), size=20, replace=False)
    expected = [candidates[i]["file_name"] for i in sorted(picked)]

    out = tmp_path / "list.txt"
    assert _script().main([str(annotations), "--count", "20", "--seed", "5", "--out", str(out)]) == 0
    assert read_image_list(out) == expected
    assert out.read_text().startswith("# 20 images of instances_train2017.json, seed 5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instances_train2017.json", "list.txt"], (
        "no .part left"
    )
    assert f"wrote 20 names to {out}" in capsys.readouterr().out
