"""The command line end to end on the shared fixture and data (acceptance checks of the foundation)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nasquant.cli import main
from tests.shared import shared_path


def _recorded_fp32_map() -> float:
    """The fixture README's FP32 mAP@[.5:.95] (centre padding), from its machine-readable twin."""
    return json.loads(shared_path("fixtures", "measured.json").read_text())["center_pad_320"][0]


@pytest.mark.parametrize(
    ("checkpoint", "data"),
    [
        ("yolo_nas_s_shapes.pt", ("data", "shapes", "val_yolo", "shapes_val.yaml")),
        ("yolo_nas_s_shapes.safetensors", ("data", "shapes", "val", "annotations.json")),
    ],
    ids=["pt-yolo-yaml", "safetensors-coco-json"],
)
def test_val_reproduces_the_fixture_readme_map(
    checkpoint: str, data: tuple[str, ...], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "metrics.json"
    model = shared_path("fixtures", checkpoint)
    # Ultralytics' key=value form and nasquant's flags read the same
    line = [f"model={model}", f"data={shared_path(*data)}", "imgsz=320", f"json={out}"]
    if checkpoint.endswith(".safetensors"):
        line = ["--model", str(model), "--data", str(shared_path(*data)), "--json", str(out)]
    code = main(["val", *line])
    assert code == 0
    metrics = json.loads(out.read_text())
    assert metrics["num_images"] == 300
    assert metrics["imgsz"] == 320  # taken from the checkpoint, not the 640 default
    assert abs(metrics["map50_95"] - _recorded_fp32_map()) <= 0.005, metrics["map50_95"]
    assert 0.0 <= metrics["map50_95"] <= metrics["map50"] <= 1.0
    assert set(metrics["per_class"]) == {"circle", "square", "triangle", "star", "cross", "ring"}
    printed = capsys.readouterr().out
    assert f"map50_95={metrics['map50_95']:.4f}" in printed
    # Ultralytics' per-class table: the "all" row, then each class with its images and instances
    header, everything, *rows = printed.splitlines()[1:9]
    assert header.split() == ["Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95"]
    assert everything.split()[:2] == ["all", "300"] and float(everything.split()[-1]) == pytest.approx(
        metrics["map50_95"], abs=5e-4
    )
    assert sorted(row.split()[0] for row in rows) == sorted(metrics["per_class"])
    assert sum(int(row.split()[2]) for row in rows) == int(everything.split()[2])


def test_predict_writes_an_annotated_image_and_json(shapes_pt: Path, tmp_path: Path) -> None:
    coco_image = sorted(shared_path("data", "coco-mini", "val2017").glob("*.jpg"))[0]
    shapes_image = sorted(shared_path("data", "shapes", "val", "images").glob("*.jpg"))[0]
    out = tmp_path / "pred"
    # a second run never mixes its files with the first's: it gets pred2
    for image, folder in ((coco_image, out), (shapes_image, tmp_path / "pred2")):
        assert main(["predict", "--model", str(shapes_pt), "--source", str(image), "--out", str(out)]) == 0
        assert (folder / f"{image.stem}.jpg").stat().st_size > 1000
        assert len(json.loads((folder / "predictions.json").read_text())) == 1
    records = json.loads((tmp_path / "pred2" / "predictions.json").read_text())
    assert records[0]["source"] == str(shapes_image)
    assert records[0]["detections"], "the trained fixture finds shapes in a shapes image"
    detection = records[0]["detections"][0]
    assert detection["class_name"] in {"circle", "square", "triangle", "star", "cross", "ring"}
    x1, y1, x2, y2 = detection["box"]
    assert 0 <= x1 < x2 <= records[0]["width"] and 0 <= y1 < y2 <= records[0]["height"]


def test_info_describes_the_checkpoint(shapes_safetensors: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "info.json"
    assert main(["info", "--model", str(shapes_safetensors), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    info = json.loads(out.read_text())
    assert info["variant"] == "yolo_nas_s" and info["num_classes"] == 6
    assert info["parameters"] > info["parameters_fused"] > 1e7
    assert info["conv_layers"] > 50 and info["gflops"] > 1
    assert "yolo_nas_s" in text and "circle" in text


def _assert_one_line_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nasquant: error:"), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_inputs_give_one_line_and_exit_code_2(
    tmp_path: Path, shapes_safetensors: Path, malicious_checkpoint: tuple[Path, Path], capsys
) -> None:
    shapes_val = str(shared_path("data", "shapes", "val_yolo", "shapes_val.yaml"))
    missing = tmp_path / "nope.pt"
    _assert_one_line_error(main(["info", "--model", str(missing)]), capsys.readouterr().err, "nope.pt")

    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_text("these are not weights\n")
    code = main(["val", "--model", str(not_a_checkpoint), "--data", shapes_val])
    _assert_one_line_error(code, capsys.readouterr().err, "notes.pth")

    evil, marker = malicious_checkpoint
    _assert_one_line_error(main(["info", "--model", str(evil)]), capsys.readouterr().err, "yolo_nas_s.pt")
    assert not marker.exists(), "the malicious pickle's payload ran"

    code = main(["info", "--model", str(shapes_safetensors), "--variant", "yolo_nas_m"])
    _assert_one_line_error(code, capsys.readouterr().err, "yolo_nas_s", "yolo_nas_m")

    code = main(["val", "--model", str(shapes_safetensors), "--data", str(tmp_path / "missing.yaml")])
    _assert_one_line_error(code, capsys.readouterr().err, "missing.yaml")


def test_ultralytics_key_values_reach_the_command(tmp_path: Path, capsys) -> None:
    # Refused by the model loader, not by argparse: every key=value became its option.
    shapes_val = str(shared_path("data", "shapes", "val_yolo", "shapes_val.yaml"))
    argv = ["val", f"model={tmp_path / 'absent.pt'}", f"data={shapes_val}", "imgsz=320", "conf=0.01"]
    _assert_one_line_error(main(argv), capsys.readouterr().err, "absent.pt")
    code = main(["val", f"model={tmp_path / 'absent.pt'}", "datta=y.yaml"])
    assert code == 2
    assert capsys.readouterr().err.startswith(
        "nasquant val: error: unknown argument 'datta=y.yaml'; val takes"
    )


@pytest.mark.parametrize("where", ["after the subcommand", "as a key", "before the subcommand"])
def test_debug_anywhere_shows_the_traceback(where: str, tmp_path: Path, capsys) -> None:
    line = ["val", "--model", str(tmp_path / "absent.pt"), "--data", "y.yaml"]
    argv = {
        "after the subcommand": [*line, "--debug"],
        "as a key": [*line, "debug=True"],
        "before the subcommand": ["--debug", *line],
    }[where]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):"), err
    assert err.splitlines()[-1].startswith("nasquant: error:") and "absent.pt" in err.splitlines()[-1]


def test_console_entry_point_exit_code_in_a_real_process(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nasquant.cli", "info", "--model", str(tmp_path / "absent.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("nasquant: error:") and "Traceback" not in result.stderr


def test_val_accepts_an_exported_onnx_and_uses_its_recorded_preprocessing(
    shapes_pt: Path, tmp_path: Path
) -> None:
    from nasquant import NAS

    onnx_path = NAS(shapes_pt).export(tmp_path / "fixture.onnx", simplify=False)
    out = tmp_path / "metrics.json"
    data = shared_path("data", "shapes", "val", "annotations.json")
    assert main(["val", "--model", str(onnx_path), "--data", str(data), "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["backend"] == "onnxruntime" and metrics["imgsz"] == 320 and metrics["protocol"] == "sg"
    assert abs(metrics["map50_95"] - _recorded_fp32_map()) <= 0.005


def test_engine_command_prints_a_trtexec_line_for_the_int8_graph(flavors: dict[str, Path], capsys) -> None:
    from tests.export.test_tensorrt import trtexec_options

    assert main(["engine", "command", str(flavors["trt"]), "--int8", "--max-batch", "8"]) == 0
    options = trtexec_options(capsys.readouterr().out.strip())
    assert options["--onnx"] == str(flavors["trt"]) and "--int8" in options
    assert options["--maxShapes"].endswith("8x3x320x320")
    # TensorRT 11 needs the AutoCast step first: two lines
    assert main(["engine", "command", str(flavors["trt"]), "--tensorrt-version", "11.0"]) == 0
    autocast, trtexec = capsys.readouterr().out.strip().splitlines()
    assert autocast.startswith("python -m modelopt.onnx.autocast") and "--int8" not in trtexec_options(
        trtexec
    )


def test_engine_and_exported_file_mistakes_give_one_line(
    flavors: dict[str, Path], fp32_onnx: Path, tmp_path: Path, capsys
) -> None:
    code = main(["engine", "command", str(flavors["cpu"])])
    _assert_one_line_error(code, capsys.readouterr().err, "CPU flavour", "*.int8.trt.onnx")
    code = main(["engine", "command", str(fp32_onnx), "--int8"])
    _assert_one_line_error(code, capsys.readouterr().err, "no Q/DQ nodes")
    code = main(["engine", "command", str(fp32_onnx), "--max-batch", "8"])
    _assert_one_line_error(code, capsys.readouterr().err, "fixed batch of 1", "dynamic_batch")
    code = main(["engine", "command", str(flavors["trt"]), "--dla-core", "0", "--tensorrt-version", "8.6"])
    _assert_one_line_error(code, capsys.readouterr().err, "too old")
    engine = tmp_path / "model.int8.engine"
    engine.write_bytes(b"not an engine")
    code = main(["bench", "--model", str(engine)])
    _assert_one_line_error(code, capsys.readouterr().err, "no sidecar beside the engine")
    code = main(
        [
            "val",
            "--model",
            str(engine),
            "--data",
            str(shared_path("data", "shapes", "val", "annotations.json")),
        ]
    )
    _assert_one_line_error(code, capsys.readouterr().err, "no sidecar beside the engine")


def test_engine_build_without_tensorrt_says_how_to_get_it(flavors: dict[str, Path], capsys) -> None:
    from nasquant.cuda import tensorrt_unavailable

    if tensorrt_unavailable() is None:
        pytest.skip("TensorRT and a GPU are present: the build test lives in tests/runtime")
    code = main(["engine", "build", str(flavors["trt"])])
    expected = {
        "tensorrt not installed": "tensorrt is not installed",
        "cuda-python not installed": "cuda-python is not installed",
        "no CUDA device": "no CUDA device",
    }
    _assert_one_line_error(code, capsys.readouterr().err, expected[tensorrt_unavailable()])


def test_an_error_line_follows_a_bar_whose_owner_never_closed_it(monkeypatch, capsys) -> None:
    # A SIGTERM right after a bar's first draw, inside its constructor: no `with` owns the bar yet.
    from tqdm import tqdm

    from nasquant import cli

    def interrupted_bench(args) -> int:
        bar = tqdm(total=1_000_000, desc="bench torch", file=sys.stderr)  # alive in the traceback's frame
        bar.update(3)
        raise cli._Terminated

    monkeypatch.setitem(cli.COMMANDS, "bench", interrupted_bench)
    assert main(["bench", "--model", "x.onnx"]) == cli.EXIT_TERMINATED
    err = capsys.readouterr().err
    assert "bench torch" in err
    assert [line for line in err.splitlines() if "nasquant" in line] == ["nasquant: terminated"]


def test_predict_info_and_bench_take_a_runs_int8_graph(
    shapes_pt: Path, calibrated: torch.nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nasquant import NAS
    from nasquant.artifacts import KEY_FLAVOR
    from nasquant.export import export_onnx, write_cpu_flavor

    metadata = {**NAS(shapes_pt).onnx_metadata(), KEY_FLAVOR: "trt"}
    trt = export_onnx(calibrated, tmp_path / "model.int8.trt.onnx", imgsz=320, metadata=metadata)
    model = str(write_cpu_flavor(trt, tmp_path / "model.int8.cpu.onnx"))
    image = sorted(shared_path("data", "shapes", "val", "images").glob("*.jpg"))[0]
    out = tmp_path / "pred"
    assert main(["predict", "--model", model, "--source", str(image), "--out", str(out)]) == 0
    detections = json.loads((out / "predictions.json").read_text())[0]["detections"]
    assert detections and detections[0]["class_name"] in NAS(shapes_pt).names
    assert main(["info", "--model", model]) == 0
    printed = capsys.readouterr().out
    assert "int8 (cpu flavour)" in printed and "320" in printed
    assert main(["bench", "--model", model, "--warmup", "1", "--iterations", "2", "--threads", "1"]) == 0
    assert "onnxruntime int8 on cpu, 320px batch 1" in capsys.readouterr().out


def test_export_nms_gives_predicts_detections_and_the_raw_graphs_map(shapes_pt: Path, tmp_path: Path) -> None:
    # The acceptance check of end-to-end export: the graph's own NMS is nasquant's post-processing.
    raw, end_to_end = tmp_path / "shapes.onnx", tmp_path / "shapes-nms.onnx"
    assert main(["export", "--model", str(shapes_pt), "--output", str(raw)]) == 0
    assert main(["export", "--model", str(shapes_pt), "--nms", "--output", str(end_to_end)]) == 0
    # the first 100 validation images (the whole set is what `val` below reads)
    images = shared_path("data", "shapes", "val", "images") / "shapes_val_0000[0-9][0-9].jpg"
    detections = {}
    for graph in (raw, end_to_end):
        out = tmp_path / f"pred-{graph.stem}"
        assert main(["predict", "--model", str(graph), "--source", str(images), "--out", str(out)]) == 0
        detections[graph] = json.loads((out / "predictions.json").read_text())
    assert len(detections[raw]) == 100 and sum(len(r["detections"]) for r in detections[raw]) > 100
    for want, got in zip(detections[raw], detections[end_to_end], strict=True):
        assert [d["class_id"] for d in got["detections"]] == [d["class_id"] for d in want["detections"]]
        for g, w in zip(got["detections"], want["detections"], strict=True):
            assert g["score"] == pytest.approx(w["score"], abs=1e-6)
            assert g["box"] == pytest.approx(w["box"], abs=1e-3)
    data = str(shared_path("data", "shapes", "val", "annotations.json"))
    maps = {}
    # the end-to-end graph's built-in conf and one-class-per-box
    for graph, extra in ((raw, ["--conf", "0.25", "--no-multi-label"]), (end_to_end, [])):
        out = tmp_path / f"{graph.stem}.json"
        assert main(["val", "--model", str(graph), "--data", data, "--json", str(out), *extra]) == 0
        metrics = json.loads(out.read_text())
        assert metrics["nms"]["conf"] == 0.25  # the end-to-end graph validates at its built-in settings
        maps[graph] = metrics["map50_95"]
    assert maps[end_to_end] == maps[raw]


def test_export_mistakes_give_one_line(shapes_pt: Path, tmp_path: Path, capsys) -> None:
    model = ["export", "--model", str(shapes_pt)]
    code = main([*model, "--conf", "0.3", "--max-det", "100"])
    _assert_one_line_error(code, capsys.readouterr().err, "--conf, --max-det", "add --nms")
    code = main([*model, "--format", "onnx-int8"])
    _assert_one_line_error(code, capsys.readouterr().err, "calibration images", "--calib")
    code = main([*model, "--fp16"])
    _assert_one_line_error(code, capsys.readouterr().err, "FP16 graph")
    code = main([*model, "--output", str(tmp_path / "model.engine")])
    _assert_one_line_error(code, capsys.readouterr().err, "writes a .onnx file")
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="OpenVINO is not installed")
def test_export_openvino_ir_is_described_and_validated_like_any_exported_file(
    shapes_pt: Path, tmp_path: Path, capsys
) -> None:
    xml = tmp_path / "shapes.xml"
    assert main(["export", "--model", str(shapes_pt), "--format", "openvino", "--output", str(xml)]) == 0
    assert xml.with_suffix(".bin").is_file() and xml.with_suffix(".onnx").is_file()  # the IR's source too
    assert main(["info", "--model", str(xml)]) == 0
    described = capsys.readouterr().out
    assert "format         openvino" in described and "circle, square" in described
    out = tmp_path / "metrics.json"
    data = str(shared_path("data", "shapes", "val", "annotations.json"))
    assert main(["val", "--model", str(xml), "--data", data, "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["backend"] == "openvino" and metrics["imgsz"] == 320
    assert abs(metrics["map50_95"] - _recorded_fp32_map()) <= 0.005
    capsys.readouterr()
    code = main(["val", "--model", str(xml), "--data", data, "--device", "cuda"])
    _assert_one_line_error(code, capsys.readouterr().err, "CPU only")
