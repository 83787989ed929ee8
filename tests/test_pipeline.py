"""`nasquant quantize` end to end on the shapes recipe, shrunk with --set so it runs in CI time."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from nasquant.cli import main
from nasquant.report import artifact_size_mb
from tests.shared import shared_path

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "shapes_s_int8.yaml"
QUICK = [
    "calibration.num_images=32",
    "validation.max_images=40",
    "benchmark.size=null",
    "benchmark.warmup=1",
    "benchmark.iterations=3",
    "quantization.quantize_all_baseline=false",
    "openvino.bf16=false",  # the bf16 row is OpenVINO's own compute choice; the backend tests cover it
    # two more exports and two passes per run; tests/pipeline/test_export_job.py covers it in the pipeline
    "quantization.bias_correction=false",
]
#: the OpenVINO rows, present when the extra is installed (CI installs it)
OPENVINO = importlib.util.find_spec("openvino") is not None


def _quantize(output: Path, *overrides: str, resume: bool = False) -> int:
    shared_path("fixtures", "yolo_nas_s_shapes.pt")  # skip with the reason when ../shared is absent
    args = ["quantize", str(RECIPE), "--output", str(output), *(["--resume"] if resume else [])]
    for override in [*QUICK, *overrides]:
        args += ["--set", override]
    return main(args)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("run") / "shapes"
    assert _quantize(output) == 0
    return output


def test_run_folder_holds_every_artifact_and_the_report(run_dir: Path) -> None:
    for name in (
        "recipe.resolved.yaml", "report.md", "report.json", "accuracy_latency.png", "calibration.safetensors",
        "model.fp32.onnx", "model.int8.trt.onnx", "model.int8.cpu.onnx", "DEPLOY.md",
        "model.fp32-nms.onnx", "model.int8-nms.trt.onnx", "model.int8-nms.cpu.onnx",  # export.nms: true
    ):  # fmt: skip
        assert (run_dir / name).stat().st_size > 0, name
    assert not list(run_dir.glob("*.part")), "no temporary file is left behind"
    resolved = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    assert resolved["calibration"]["num_images"] == 32


def test_report_rows_follow_the_contract(run_dir: Path) -> None:
    int8_skipped = [f"heads.head{i}.{p}" for i in (1, 2, 3) for p in ("reg_convs.0.seq.conv", "reg_pred")]
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report) == {"recipe", "host", "rows"}
    rows = {row["name"]: row for row in report["rows"]}
    openvino = ["OpenVINO FP32", "OpenVINO INT8 selective", "OpenVINO INT8 selective (trt flavor)"]
    assert list(rows) == [
        "torch FP32", "ORT FP32", "ORT INT8 selective", "ORT INT8 selective (trt flavor)",
        *(openvino if OPENVINO else []), "TRT FP16", "TRT INT8",
    ]  # fmt: skip
    from nasquant.cuda import tensorrt_unavailable

    reason = tensorrt_unavailable()
    if reason is not None:  # CI: the rows are there and say why
        for name in ("TRT FP16", "TRT INT8"):
            assert rows[name]["status"] == f"skipped: {reason}" and rows[name]["map50_95"] is None
    else:
        assert rows["TRT INT8"]["status"] == "ok" and rows["TRT INT8"]["skipped_layers"] == int8_skipped
    fp32, int8 = rows["torch FP32"], rows["ORT INT8 selective"]
    assert rows["ORT FP32"]["map50_95"] == pytest.approx(fp32["map50_95"], abs=1e-3)
    assert int8["status"] == "ok" and int8["flavor"] == "cpu" and int8["precision"] == "int8"
    assert (
        abs(int8["delta_map50_95"]) < 0.02
    )  # 40 images: a loose bound; the full-set check is in tests/quant
    assert int8["skipped_layers"] == int8_skipped
    # the speedup is the one timed back to back with the FP32 graph, round by round
    paired = int8["extra"]
    assert int8["p50_ms"] > 0 and int8["speedup"] == paired["speedup_paired"] > 0
    assert paired["speedup_method"] == "paired" and paired["speedup_paired_rounds"] == 1  # 3 iterations
    assert paired["speedup_paired_q1"] <= paired["speedup_paired"] <= paired["speedup_paired_q3"]
    assert isinstance(int8["extra"]["contended"], bool) and int8["extra"]["bench_attempts"] >= 1
    if OPENVINO:
        ov_fp32, ov_int8 = rows["OpenVINO FP32"], rows["OpenVINO INT8 selective (trt flavor)"]
        assert ov_fp32["backend"] == ov_int8["backend"] == "openvino" and ov_int8["flavor"] == "trt"
        # the same FP32 file at f32 compute: ORT's mAP to float rounding
        assert ov_fp32["map50_95"] == pytest.approx(rows["ORT FP32"]["map50_95"], abs=1e-3)
        assert abs(ov_int8["delta_map50_95"]) < 0.02 and ov_int8["skipped_layers"] == int8_skipped
        # the CPU flavour's speedup is over OpenVINO FP32, timed back to back; the TensorRT file is there
        # for its accuracy only, like its ONNX Runtime row
        ov_cpu = rows["OpenVINO INT8 selective"]
        assert ov_cpu["speedup"] == ov_cpu["extra"]["speedup_paired"] > 0
        # the CPU flavour runs on OpenVINO as the IR the run ships (.xml + .bin)
        ir = run_dir / "model.int8.cpu.xml"
        assert rows["OpenVINO INT8 selective"]["size_mb"] == pytest.approx(artifact_size_mb(ir))
        assert rows["OpenVINO INT8 selective"]["size_mb"] > 10 * ir.stat().st_size / 1e6
    for name in [n for n in rows if n.endswith("(trt flavor)")]:
        row = rows[name]
        assert row["map50_95"] > 0 and row["p50_ms"] is None and row["speedup"] is None, name
        assert "TRT INT8 row" in row["extra"]["untimed"], name
    assert "not timed, the TensorRT-flavour file" in (run_dir / "report.md").read_text()


def test_resume_reuses_every_finished_stage_and_reproduces_the_report(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    capsys.readouterr()
    assert _quantize(resumed, resume=True) == 0
    log = capsys.readouterr().out
    assert "[calibrate] 32 images, max" in log and log.count("(reused)") >= 5
    before = json.loads((run_dir / "report.json").read_text())["rows"]
    after = json.loads((resumed / "report.json").read_text())["rows"]
    assert [r["map50_95"] for r in after] == [r["map50_95"] for r in before]


CACHED_STAGES = (
    "calibrate",
    "export model.fp32",
    "export model.int8",
    "evaluate torch FP32",
    "evaluate ORT FP32",
    "evaluate ORT INT8 selective",
    "evaluate ORT INT8 selective (trt flavor)",
)
EVALUATE_ALL = {s for s in CACHED_STAGES if s.startswith("evaluate")}
EVALUATE_ORT = EVALUATE_ALL - {"evaluate torch FP32"}
EVALUATE_INT8 = {"evaluate ORT INT8 selective", "evaluate ORT INT8 selective (trt flavor)"}
EXPORT_ALL = {"export model.fp32", "export model.int8"}


@pytest.mark.parametrize(
    ("change", "rerun"),
    [
        ("benchmark.iterations=4", EVALUATE_ALL),
        # names live in the graphs; new files: the ORT rows run them anew (any export field, e.g. the
        # opset, reruns the same stages: a stage cannot read a field it did not declare)
        ("model.class_names=[a,b,c,d,e,f]", EXPORT_ALL | EVALUATE_ORT),
        ("benchmark.batch_sizes=[2]", EXPORT_ALL | EVALUATE_ALL),  # a static batch is baked in
        # another draw of the same number of images: the calibration reads the images, not only fields
        ("calibration.seed=1", {"calibrate", "export model.int8"} | EVALUATE_INT8),
        ("quantization.skip=[heads.head1.reg_pred]", {"export model.int8"} | EVALUATE_INT8),
    ],
)
def test_resume_reruns_exactly_the_stages_that_read_a_changed_field(
    run_dir: Path, tmp_path: Path, capsys, change: str, rerun: set[str]
) -> None:
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    capsys.readouterr()
    # OpenVINO's rows read the same graphs; left out here, they would only rerun with the ORT ones
    assert _quantize(resumed, change, "openvino.enabled=false", resume=True) == 0
    lines = {
        line.split("]")[0][1:]: line for line in capsys.readouterr().out.splitlines() if line.startswith("[")
    }
    # every cached stage ran (the other [calibrate] line is the image draw, which is not a stage)
    assert set(CACHED_STAGES) <= lines.keys()
    assert {stage for stage in CACHED_STAGES if not lines[stage].endswith("(reused)")} == rerun


def test_report_command_and_accuracy_gate(run_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["report", str(run_dir), "--fail-on-drop", "100"]) == 0
    assert "ORT INT8 selective" in capsys.readouterr().out
    assert main(["report", str(run_dir), str(run_dir)]) == 0

    worse = tmp_path / "worse"
    worse.mkdir()
    report = json.loads((run_dir / "report.json").read_text())
    fp32 = next(row for row in report["rows"] if row["name"] == "torch FP32")
    for row in report["rows"]:
        if row["precision"] == "int8":
            row["map50_95"] = fp32["map50_95"] - 0.01
            row["delta_map50_95"] = -0.01
    (worse / "report.json").write_text(json.dumps(report))
    assert main(["report", str(worse), "--fail-on-drop", "0.5"]) == 1
    assert "accuracy gate" in capsys.readouterr().err
    assert main(["report", str(worse), "--fail-on-drop", "1.5"]) == 0


def test_calibrating_on_validation_images_is_refused(tmp_path: Path, capsys) -> None:
    val_images = shared_path("data", "shapes", "val", "images")
    code = _quantize(tmp_path / "overlap", f"calibration.data={val_images}")
    err = capsys.readouterr().err
    assert (
        code == 2 and "calibration images are validation images or copies" in err and "allow_overlap" in err
    )


def test_a_misspelled_recipe_key_names_the_key_and_the_file(tmp_path: Path, capsys) -> None:
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["calibraton"] = recipe.pop("calibration")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    assert main(["quantize", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "'calibraton'" in err and "did you mean 'calibration'" in err


def test_coco_recipe_offline_fails_in_one_line_naming_the_urls(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("NASQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NASQUANT_MIRROR", "http://127.0.0.1:9")  # a closed port: no internet in tests
    monkeypatch.setenv("COCO_ROOT", str(tmp_path / "coco"))
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "s_int8.yaml"
    assert main(["quantize", str(recipe), "--output", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "http://127.0.0.1:9" in lines[0] and "yolo_nas_s" in lines[0]


def test_a_run_removes_the_partial_files_a_killed_run_left(tmp_path: Path) -> None:
    from nasquant.pipeline import open_run
    from nasquant.recipe import load_recipe

    run = tmp_path / "run"
    (run / "bench").mkdir(parents=True)
    for orphan in (run / ".model.fp32.onnx.x1.part", run / "bench" / ".model.int8.trt.onnx.x2.part"):
        orphan.write_bytes(b"half")
    (run / "model.fp32.onnx").write_bytes(b"a finished artifact")
    lines: list[str] = []
    with open_run(load_recipe(RECIPE), output=run, resume=False, progress=False, log=lines.append):
        pass
    assert lines == [f"[run] removed 2 partial file(s) an interrupted run left in {run}"]
    assert sorted(p.name for p in run.rglob("*")) == ["bench", "model.fp32.onnx"]


def test_a_new_run_removes_the_previous_report_before_any_stage(tmp_path: Path) -> None:
    # Interrupted after export, a rerun would otherwise leave the old report beside new models, and a
    # CI gate would read it.
    from nasquant.artifacts import ArtifactLayout
    from nasquant.pipeline import open_run
    from nasquant.recipe import load_recipe

    run = tmp_path / "run"
    run.mkdir()
    report = [path.name for path in ArtifactLayout(run).report_files]
    for name in (*report, "model.fp32.onnx", "calibration.safetensors"):
        (run / name).write_text("from the previous run")
    lines: list[str] = []
    with open_run(load_recipe(RECIPE), output=run, resume=True, progress=False, log=lines.append):
        remaining = sorted(p.name for p in run.iterdir())
    assert remaining == [".nasquant.lock", "calibration.safetensors", "model.fp32.onnx"]
    assert lines == [f"[run] removed the previous report ({', '.join(report)}): this run writes its own"]


def test_a_second_run_into_a_held_folder_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    from nasquant.io import run_lock

    run = tmp_path / "run"
    with run_lock(run):  # what a live run holds; another process's lock behaves the same (tests/test_io.py)
        (run / "report.json").write_text("{}")
        assert _quantize(run) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{run} is in use by another nasquant run (pid {os.getpid()} on host" in err
    assert [p.name for p in run.iterdir()] == ["report.json"], "nothing was touched"


def test_stage_keys_change_with_the_nasquant_version(monkeypatch: pytest.MonkeyPatch) -> None:
    # --resume must not reuse a calibration or export an older nasquant made.
    from nasquant.pipeline import context

    key = context.stage_key("recipe-section", 42)
    assert context.stage_key("recipe-section", 42) == key
    monkeypatch.setattr(context, "__version__", "999.0")
    assert context.stage_key("recipe-section", 42) != key


def test_the_deploy_guide_hands_off_commands_and_the_io_contract(run_dir: Path) -> None:
    from tests.export.test_tensorrt import trtexec_options

    guide = (run_dir / "DEPLOY.md").read_text()
    trtexec_lines = [line for line in guide.splitlines() if line.startswith("trtexec ")]
    assert len(trtexec_lines) >= 4
    first = trtexec_options(trtexec_lines[0])  # the T4 INT8 build, TensorRT 10
    assert first["--onnx"] == "model.int8.trt.onnx" and "--int8" in first
    assert (run_dir / first["--onnx"]).is_file()  # relative to the run folder the guide sits in
    assert any("--useDLACore" in line for line in trtexec_lines)  # the Jetson DLA variant
    for fact in ("N x 3 x 320 x 320", "divide by 255", "value 114", "IoU > 0.7", "0: "):
        assert fact in guide, fact
    # the run's end-to-end graphs, named as written, with the settings they were built with
    assert (
        "`model.fp32-nms.onnx`, `model.int8-nms.trt.onnx`, `model.int8-nms.cpu.onnx` end in detections"
        in guide
    )
    assert "conf 0.25, IoU 0.7" in guide


def test_skip_auto_searches_and_records_its_choice(tmp_path: Path, capsys) -> None:
    output = tmp_path / "auto"
    budget = ["quantization.skip=auto", "quantization.max_map_drop=0.5", "quantization.max_fp_layers=2"]
    cheap = [
        "quantization.sensitivity_images=1",
        "quantization.sensitivity_top_k=1",
        "quantization.sensitivity_val_images=24",
        "input.size=160",  # the per-layer analysis is 200 fake-quantized forwards: a quarter of the pixels
        "engines.enabled=false",
        "openvino.enabled=false",  # the search is the subject; OpenVINO's rows are checked above
    ]
    # `nasquant sensitivity` alone: the three evidence files (and, for skip: auto, the search).
    args = ["sensitivity", str(RECIPE), "--output", str(output)]
    assert main([*args, *(a for o in [*QUICK, *budget, *cheap] for a in ("--set", o))]) == 0
    for name in ("sensitivity.json", "sensitivity.md", "sensitivity.png"):
        assert (output / name).stat().st_size > 0, name
    evidence = json.loads((output / "sensitivity.json").read_text())
    assert len(evidence["layers"]) == 100 and evidence["search"]["met"]
    # The analysis and the search measure mAP on the first 24 of the 40 validation images.
    assert (
        evidence["map_images"] == 24
        and "mAP50-95 on 24 validation images" in (output / "sensitivity.md").read_text()
    )
    # The pipeline over the same folder reuses the calibration, the analysis and the search.
    capsys.readouterr()
    assert _quantize(output, *budget, *cheap, resume=True) == 0
    stages = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(("[sensitivity]", "[search]"))
    ]
    assert len(stages) == 2 and all(line.endswith("(reused)") for line in stages), stages
    # A budget the all-INT8 model meets: nothing in FP, and the resolved recipe says so explicitly,
    # so rerunning it reproduces the choice without searching.
    resolved = yaml.safe_load((output / "recipe.resolved.yaml").read_text())
    assert resolved["quantization"]["skip"] == evidence["search"]["chosen"] == []
    rows = {row["name"]: row for row in json.loads((output / "report.json").read_text())["rows"]}
    selective = rows["ORT INT8 selective"]
    assert selective["skipped_layers"] == [] and "sensitivity search" in selective["extra"]["fp_reason"]
    assert "chosen by the sensitivity search" in (output / "report.md").read_text()
    # A new budget reuses the measured layers and only searches again.
    capsys.readouterr()
    assert _quantize(output, *budget[:2], "quantization.max_fp_layers=1", *cheap, resume=True) == 0
    log = capsys.readouterr().out
    assert "[sensitivity]" in log and next(
        line for line in log.splitlines() if line.startswith("[sensitivity]")
    ).endswith("(reused)")
    assert not next(
        line for line in log.splitlines() if line.startswith("[search] 0 layer(s) in FP,")
    ).endswith("(reused)")
