"""The shipped COCO recipes (``recipes/{s,m,l}_int8.yaml``, unchanged) end to end, offline, the way a user
with COCO and a checkpoint runs them: ``COCO_ROOT`` points at a COCO-shaped folder (built here from
coco-mini), the weights are a local super-gradients ``.pth`` (deterministic weights: the structure is
what is tested, mAP on them is ~0), and only image counts are shrunk with ``--set``."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from nasquant.artifacts import CALIBRATION_LIST_NAME, TIMINGS_NAME
from nasquant.cli import main
from nasquant.cuda import tensorrt_unavailable
from nasquant.data.calibration import read_image_list
from tests.checkpoints import write_sg_checkpoint
from tests.shared import shared_path

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
BOX_BRANCH = [f"heads.head{i}.{p}" for i in (1, 2, 3) for p in ("reg_convs.0.seq.conv", "reg_pred")]
ROWS = [
    "torch FP32", "ORT FP32", "ORT INT8 selective", "ORT INT8 selective (trt flavor)",
    "ORT INT8 all-layers", "ORT INT8 all-layers (trt flavor)", "TRT FP16", "TRT INT8",
]  # fmt: skip


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """COCO's layout: ``train2017/``, ``val2017/``, ``annotations/instances_val2017.json``."""
    mini = shared_path("data", "coco-mini")
    root = tmp_path_factory.mktemp("coco")
    for part in ("train2017", "val2017", "annotations"):
        shutil.copytree(mini / part, root / part)
    return root


@pytest.fixture(scope="module")
def offline(coco_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``COCO_ROOT`` set; a download attempt would hit a dead local port instead of the internet."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COCO_ROOT", str(coco_root))
        patch.setenv("NASQUANT_CACHE", str(tmp_path_factory.mktemp("cache")))
        patch.setenv("NASQUANT_MIRROR", "http://127.0.0.1:9")
        yield


def _quantize(recipe: Path, output: Path, *overrides: str, resume: bool = False) -> int:
    args = ["quantize", str(recipe), "--output", str(output), *(["--resume"] if resume else [])]
    for override in overrides:
        args += ["--set", override]
    return main(args)


def _small(checkpoint: Path, calibration: int, validation: int) -> list[str]:
    return [
        f"model.checkpoint={checkpoint}",
        f"calibration.num_images={calibration}",
        f"validation.max_images={validation}",
        "benchmark.warmup=1",
        "benchmark.iterations=3",
        # OpenVINO's rows read the same graphs (tests/test_pipeline.py checks them); here they would
        # only add minutes at COCO's 640 px
        "openvino.enabled=false",
        # two passes over the calibration images per INT8 model at 640 px; the bias correction itself
        # is tested on the fixture (tests/quant, tests/pipeline/test_export_job.py)
        "quantization.bias_correction=false",
    ]


def _check_report(run_dir: Path, variant: str, *, all_layers: bool = True) -> None:
    expected = [name for name in ROWS if all_layers or "all-layers" not in name]
    report = json.loads((run_dir / "report.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == expected
    reason = tensorrt_unavailable()
    for name, row in rows.items():
        if name.startswith("TRT") and reason is not None:  # here: the rows are there and say why
            assert row["status"] == f"skipped: {reason}" and row["map50_95"] is None, name
        else:
            assert row["status"] == "ok" and 0 <= row["map50_95"] <= 1, name
            # a TensorRT-flavour file on ONNX Runtime is checked for accuracy, not timed
            assert (row["p50_ms"] is None) == name.endswith("(trt flavor)"), name
    assert rows["ORT INT8 selective"]["skipped_layers"] == BOX_BRANCH
    assert not all_layers or rows["ORT INT8 all-layers"]["skipped_layers"] == []
    assert report["recipe"]["model"]["variant"] == f"yolo_nas_{variant}"
    for name in ("model.fp32.onnx", "model.int8.cpu.onnx", "model.int8.trt.onnx", "calibration.safetensors"):
        assert (run_dir / name).stat().st_size > 0, name
    timed = json.loads((run_dir / TIMINGS_NAME).read_text())["stages"]
    evaluated = [f"evaluate {name}" for name in expected if not name.startswith("TRT")]
    exports = ["export model.fp32", "export model.int8", *(["export model.int8-all"] if all_layers else [])]
    paired = [
        f"paired {name}" for name in expected if name.startswith("ORT INT8") and "trt flavor" not in name
    ]
    stages = ["load", "calibrate", "select", *exports, *evaluated, *paired, "deploy"]
    assert [stage["stage"] for stage in timed] == stages
    assert all(stage["seconds"] >= 0 and stage["reused"] is False for stage in timed)


@pytest.fixture(scope="module")
def s_run(offline: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """``recipes/s_int8.yaml`` run once: (run folder, checkpoint, what it printed)."""
    work = tmp_path_factory.mktemp("s")
    checkpoint = write_sg_checkpoint(work / "yolo_nas_s_coco.pth", "yolo_nas_s")
    log = work / "stdout.txt"  # capsys is per test; the module's one run keeps what it printed here
    # Run from `work` into a relative folder, as a user does: the files it writes must not depend on the cwd.
    with pytest.MonkeyPatch.context() as patch, log.open("w") as out, contextlib.redirect_stdout(out):
        patch.chdir(work)
        code = _quantize(RECIPES / "s_int8.yaml", Path("run"), *_small(checkpoint, 16, 8))
    assert code == 0, log.read_text()[-2000:]
    return work / "run", checkpoint, log.read_text()


def test_s_recipe_runs_end_to_end_without_a_calibration_list(s_run, coco_root: Path) -> None:
    run_dir, _, printed = s_run
    _check_report(run_dir, "s")
    assert not list(run_dir.rglob("*.part")), "no temporary file is left behind"

    # The draw is written to the run folder and pinned in the resolved recipe; one line says how to reuse it.
    listed = run_dir / CALIBRATION_LIST_NAME
    names = read_image_list(listed)
    assert len(names) == len(set(names)) == 16
    assert set(names) <= {p.name for p in (coco_root / "train2017").iterdir()}
    resolved = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    assert resolved["calibration"]["image_list"] == str(listed)
    assert resolved["calibration"]["data"] == str(coco_root / "train2017")
    (hint,) = [line for line in printed.splitlines() if "calibration.image_list=" in line]
    assert hint.startswith("[calibrate] drew 16 of 128 images (seed 0") and hint.endswith(f"={listed}")

    # Nothing was written into the user's COCO folder.
    mini = shared_path("data", "coco-mini")
    assert sorted(p.relative_to(coco_root) for p in coco_root.rglob("*")) == sorted(
        p.relative_to(mini) for p in mini.rglob("*") if p.name != "README.md"
    )


def test_rerunning_the_resolved_recipe_reuses_the_pinned_images(s_run, tmp_path: Path, capsys) -> None:
    run_dir, _, _ = s_run
    rerun = tmp_path / "rerun"
    shutil.copytree(run_dir, rerun)
    # recipe.resolved.yaml is itself a recipe: its image_list pins the draw, so nothing is drawn again
    # and the calibration (and every later stage) is the same run's.
    assert _quantize(rerun / "recipe.resolved.yaml", rerun, resume=True) == 0
    log = capsys.readouterr().out
    (calibrate_line,) = [line for line in log.splitlines() if line.startswith("[calibrate]")]
    assert calibrate_line.startswith("[calibrate] 16 images, max") and calibrate_line.endswith("(reused)")
    assert log.count("(reused)") >= 8  # calibrate, export and the six evaluated rows
    assert read_image_list(rerun / CALIBRATION_LIST_NAME) == read_image_list(run_dir / CALIBRATION_LIST_NAME)


def test_a_configured_list_that_is_missing_names_the_command_that_makes_it(
    s_run, tmp_path: Path, capsys
) -> None:
    _, checkpoint, _ = s_run
    missing = tmp_path / "coco_train2017_512.txt"
    overrides = [*_small(checkpoint, 16, 8), f"calibration.image_list={missing}"]
    assert _quantize(RECIPES / "s_int8.yaml", tmp_path / "run", *overrides) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"calibration.image_list {missing} does not exist" in err
    assert "python calibration/make_coco_list.py" in err and f"--out {missing}" in err
    assert "drop calibration.image_list to draw 16 images" in err


@pytest.mark.parametrize("variant", ["m", "l"])
def test_m_and_l_recipes_run_end_to_end(variant: str, offline: None, tmp_path: Path) -> None:
    # The S recipe runs at its 640 px above; M and L at 320 px: their architectures, skip lists and
    # every stage are what is tested here, and 640 px made these two runs 2.5 minutes of every CI run.
    # The quantize-everything baseline (the S run covers it) would add an export and two rows each.
    checkpoint = write_sg_checkpoint(tmp_path / f"yolo_nas_{variant}_coco.pth", f"yolo_nas_{variant}")
    run_dir = tmp_path / "run"
    overrides = [*_small(checkpoint, 8, 4), "input.size=320", "quantization.quantize_all_baseline=false"]
    assert _quantize(RECIPES / f"{variant}_int8.yaml", run_dir, *overrides) == 0
    _check_report(run_dir, variant, all_layers=False)
    assert len(read_image_list(run_dir / CALIBRATION_LIST_NAME)) == 8
