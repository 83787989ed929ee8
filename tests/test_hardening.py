"""Every bad input, fault and interruption found by probing the CLI ends in one clear line.

Table-driven over crafted inputs (``tests/crafted.py``), each generated here and a few KB at most. For
every case: the exit code (2 bad input, 1 gate failure or environment), exactly one line on stderr
naming the problem, no traceback, no input modified and no file left behind. Bombs run in a child
process with a deadline, so a regression fails the test instead of stalling the suite.
"""

from __future__ import annotations

import hashlib
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from nasquant.cli import EXIT_TERMINATED, main
from tests import crafted
from tests.shared import shared_path

Case = Callable[[Path], list[str]]
# A bomb that is not defused takes minutes to hours; the fixed code answers in a couple of seconds
# (the deadline only stops a hang, it is not a speed goal).
DEADLINE_S = 120


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _pt() -> str:
    return str(shared_path("fixtures", "yolo_nas_s_shapes.pt"))


def _val() -> str:
    return str(shared_path("data", "shapes", "val", "annotations.json"))


def _val_with(*options: str) -> Case:
    """``val`` of the fixture on the shapes set, with ``options`` added."""
    return lambda tmp: ["val", "--model", _pt(), "--data", _val(), *options]


def _checkpoint(payload: bytes, *, legacy: bool = False) -> Case:
    def build(tmp: Path) -> list[str]:
        path = (crafted.legacy_checkpoint if legacy else crafted.zip_checkpoint)(tmp / "model.pt", payload)
        return ["info", "--model", str(path)]

    return build


def _safetensors(metadata: dict[str, str], tensor: torch.Tensor | None = None) -> Case:
    def build(tmp: Path) -> list[str]:
        tensors = {"heads.head1.cls_pred.weight": torch.zeros(6, 64, 1, 1) if tensor is None else tensor}
        path = crafted.safetensors_checkpoint(tmp / "model.safetensors", tensors, metadata)
        return ["val", "--model", str(path), "--data", _val()]

    return build


def _coco(**json_fields) -> Case:
    def build(tmp: Path) -> list[str]:
        (tmp / "images").mkdir()
        files = [crafted.png_image(tmp / "images" / f"{i}.png", seed=i) for i in range(2)]
        return [
            "val",
            "--model",
            _pt(),
            "--data",
            str(crafted.coco_json(tmp / "instances.json", files, **json_fields)),
        ]

    return build


def _nan_box(tmp: Path) -> list[str]:
    (tmp / "images").mkdir()
    crafted.png_image(tmp / "images" / "0.png")
    (tmp / "instances.json").write_text(
        '{"images": [{"id": 1, "file_name": "0.png"}], "categories": [{"id": 1, "name": "x"}], '
        '"annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, NaN, 4]}]}'
    )
    return ["val", "--model", _pt(), "--data", str(tmp / "instances.json")]


def _yolo(
    label: bytes = b"0 0.5 0.5 0.2 0.2\n", data_yaml: str = "path: .\nval: images\nnames: [thing]\n"
) -> Case:
    def build(tmp: Path) -> list[str]:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        crafted.png_image(tmp / "images" / "a.png")
        (tmp / "labels" / "a.txt").write_bytes(label)
        (tmp / "data.yaml").write_text(data_yaml)
        return ["val", "--model", _pt(), "--data", str(tmp / "data.yaml")]

    return build


def _recipe(extra: str = "", *, calibration: str = "") -> Case:
    """``quantize`` on a recipe over the shared fixture; ``calibration`` adds lines to that section."""

    def build(tmp: Path) -> list[str]:
        text = (
            f"model:\n  checkpoint: {_pt()}\n"
            f"calibration:\n  data: {shared_path('data', 'shapes', 'calib')}\n{calibration}"
            f"validation:\n  data: {_val()}\n" + extra
        )
        (tmp / "recipe.yaml").write_text(text)
        return ["quantize", str(tmp / "recipe.yaml"), "--output", str(tmp / "run")]

    return build


def _report(int8_map: object, **kwargs) -> Case:
    def build(tmp: Path) -> list[str]:
        crafted.report_json(tmp / "run" / "report.json", int8_map, **kwargs)
        return ["report", str(tmp / "run"), "--fail-on-drop", "0.5"]

    return build


def _raw_report(text: str) -> Case:
    def build(tmp: Path) -> list[str]:
        (tmp / "run").mkdir()
        (tmp / "run" / "report.json").write_text(text)
        return ["report", str(tmp / "run")]

    return build


def _corrupt_stages(tmp: Path) -> list[str]:
    argv = _recipe("")(tmp)
    (tmp / "run").mkdir()
    (tmp / "run" / "stages.json").write_text("{not json")
    return [*argv, "--resume"]


def _predict_into_sources(tmp: Path) -> list[str]:
    crafted.png_image(tmp / "photo.png")
    return ["predict", "--model", _pt(), "--source", str(tmp), "--out", str(tmp), "--exist-ok"]


def _onnx(build_file: Callable[[Path], Path], *command: str) -> Case:
    def build(tmp: Path) -> list[str]:
        path = build_file(tmp)
        return [part.replace("MODEL", str(path)) for part in command]

    return build


def _empty_onnx(tmp: Path) -> Path:
    (tmp / "model.onnx").write_bytes(b"")
    return tmp / "model.onnx"


def _outside_onnx(tmp: Path) -> Path:
    (tmp / "sub").mkdir()
    return crafted.onnx_with_outside_data(tmp / "sub" / "model.onnx")


# (case id, builder, exit code, fragment of the one stderr line, run in a child process with a deadline)
CASES: list[tuple[str, Case, int, str, bool]] = [
    # checkpoints: structure bombs and broken tensors, refused before anything unpickles or allocates them
    ("pickle-tuple-key-bomb", _checkpoint(crafted.tuple_key_bomb()), 2, "expands to more than", True),
    ("pickle-persistent-id-bomb", _checkpoint(crafted.persistent_id_bomb()), 2, "expands to more than", True),
    ("pickle-nesting-bomb", _checkpoint(crafted.nesting_bomb()), 2, "nest more than 256 deep", True),
    ("pickle-memo-bomb", _checkpoint(crafted.memo_bomb()), 2, "memo index 4294967295", True),
    (
        "legacy-pickle-bomb",
        _checkpoint(crafted.tuple_key_bomb(), legacy=True),
        2,
        "expands to more than",
        True,
    ),
    (
        "zip-bomb",
        lambda tmp: ["info", "--model", str(crafted.zip_bomb(tmp / "model.pt"))],
        2,
        "zip bomb",
        True,
    ),
    (
        "stride-0-tensor",
        lambda tmp: ["info", "--model", str(crafted.stride_zero_checkpoint(tmp / "model.pt"))],
        2,
        "claims 1,000,000,000,000 elements but its storage holds 1",
        True,
    ),
    ("input-size-0x0", _safetensors({"input_size": "0x0"}), 2, "recorded preprocessing is impossible", False),
    ("input-size-5000-digits", _safetensors({"input_size": "9" * 5000 + "x1"}), 2, "is not HxW", False),
    (
        "nan-weights",
        _safetensors({}, torch.full((6, 64, 1, 1), float("nan"))),
        2,
        "holds NaN or infinite",
        False,
    ),
    (
        "inf-weights",
        _safetensors({}, torch.full((6, 64, 1, 1), float("inf"))),
        2,
        "holds NaN or infinite",
        False,
    ),
    # datasets
    (
        "coco-string-image-id",
        _coco(images=[{"id": "a", "file_name": "0.png"}]),
        2,
        "has id 'a', not an integer",
        False,
    ),
    (
        "coco-float-category-id",
        _coco(categories=[{"id": 1.5, "name": "x"}]),
        2,
        "has id 1.5, not an integer",
        False,
    ),
    (
        "coco-negative-box",
        _coco(annotations=[{"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, -3, 4]}]),
        2,
        "annotation #0 (id 5) has a box of width -3",
        False,
    ),
    (
        "coco-zero-box",
        _coco(annotations=[{"id": 6, "image_id": 1, "category_id": 1, "bbox": [1, 1, 0, 4]}]),
        2,
        "box of width 0 and height 4",
        False,
    ),
    ("coco-nan-box", _nan_box, 2, "NaN is not a JSON number", False),
    (
        "coco-string-image-ref",
        _coco(annotations=[{"id": 6, "image_id": "1", "category_id": 1, "bbox": [1, 1, 2, 4]}]),
        2,
        "has image_id '1', not an integer",
        False,
    ),
    ("yolo-label-not-utf8", _yolo(label=b"0 0.5 0.5 0.2 0.2 \xff\xfe\n"), 2, "is not UTF-8 text", False),
    ("yolo-zero-size-label", _yolo(label=b"0 0.5 0.5 0 0.2\n"), 2, "zero width or height", False),
    (
        "data-yaml-alias-bomb",
        _yolo(data_yaml=crafted.yaml_alias_bomb()),
        2,
        "aliases expand the document",
        True,
    ),
    ("data-yaml-nesting", _yolo(data_yaml="val: " + "[" * 5000 + "]" * 5000), 2, "nests more than", True),
    (
        "data-yaml-split-not-a-path",
        _yolo(data_yaml="val: [[a, b]]\nnames: [x]\n"),
        2,
        "a path or a list of paths",
        False,
    ),
    # command-line values, checked when read
    (
        "device-meta",
        _val_with("--device", "meta"),
        2,
        "unknown device 'meta'",
        False,
    ),
    (
        "engine-device-cuda-x",
        lambda tmp: ["bench", "--model", str(tmp / "m.engine"), "--device", "cuda:x"],
        2,
        "unknown device 'cuda:x'",
        False,
    ),
    (
        "engine-on-cpu",
        lambda tmp: ["bench", "--model", str(tmp / "m.engine"), "--device", "cpu"],
        2,
        "run on a CUDA device",
        False,
    ),
    (
        "conf-1.5",
        _val_with("--conf", "1.5"),
        2,
        "--conf: must be at most 1",
        False,
    ),
    (
        "conf-nan",
        lambda tmp: ["predict", "--model", _pt(), "--source", _val(), "--conf", "nan"],
        2,
        "--conf: expected a number",
        False,
    ),
    (
        "top-k--1",
        _val_with("--top-k", "-1"),
        2,
        "--top-k: must be at least 1",
        False,
    ),
    (
        "max-det-0",
        _val_with("--max-det", "0"),
        2,
        "--max-det: must be at least 1",
        False,
    ),
    (
        "imgsz-0",
        _val_with("--imgsz", "0"),
        2,
        "--imgsz: must be at least 32",
        False,
    ),
    (
        "bench-imgsz-33",
        lambda tmp: ["bench", "--model", _pt(), "--imgsz", "33"],
        2,
        "--imgsz: must be a multiple of 32",
        False,
    ),
    (
        "bench-huge-batch",
        lambda tmp: ["bench", "--model", _pt(), "--batch", "1000000000"],
        2,
        "of input alone",
        False,
    ),
    (
        "bench-threads-0",
        lambda tmp: ["bench", "--model", _pt(), "--threads", "0"],
        2,
        "--threads: must be at least 1",
        False,
    ),
    (
        "fail-on-drop-negative",
        lambda tmp: ["report", str(tmp), "--fail-on-drop", "-1"],
        2,
        "--fail-on-drop: must be at least 0",
        False,
    ),
    (
        "workspace-mb--1",
        _onnx(_empty_onnx, "engine", "command", "MODEL", "--workspace-mb", "-1"),
        2,
        "--workspace-mb: must be at least 1",
        False,
    ),
    (
        "opt-level-9",
        _onnx(_empty_onnx, "engine", "command", "MODEL", "--opt-level", "9"),
        2,
        "--opt-level: must be at most 5",
        False,
    ),
    (
        "dla-core--1",
        _onnx(_empty_onnx, "engine", "command", "MODEL", "--dla-core", "-1"),
        2,
        "--dla-core: must be at least 0",
        False,
    ),
    (
        "unknown-key-value",
        lambda tmp: ["val", "model=x", "data=y", "foo=1"],
        2,
        "unknown argument 'foo=1'; val takes model, ",
        False,
    ),
    # exported files
    (
        "empty-onnx-val",
        _onnx(_empty_onnx, "val", "--model", "MODEL", "--data", "DATA"),
        2,
        "holds no graph",
        False,
    ),
    ("empty-onnx-engine", _onnx(_empty_onnx, "engine", "command", "MODEL"), 2, "holds no graph", False),
    (
        "onnx-data-outside-folder",
        _onnx(_outside_onnx, "engine", "command", "MODEL", "--fp16"),
        2,
        "points outside the directory",
        False,
    ),
    (
        "onnx-data-outside-folder-ort",
        _onnx(_outside_onnx, "bench", "--model", "MODEL"),
        2,
        "cannot load ONNX model",
        False,
    ),
    # the CI gate fails closed
    ("report-nan-map", _report(float("nan")), 1, "ORT INT8: mAP50-95 is nan, not a measured number", False),
    ("report-text-map", _report("high"), 1, "ORT INT8: mAP50-95 is 'high'", False),
    ("report-missing-map", _report(None), 1, "ORT INT8: mAP50-95 is missing", False),
    ("report-nan-delta", _report(0.79, delta=float("nan")), 1, "its mAP drop vs FP32 is nan", False),
    ("report-failed-row", _report(0.79, int8_status="failed: crashed"), 1, "marked 'failed: crashed'", False),
    ("report-rows-not-objects", _raw_report('{"rows": [1, 2]}'), 2, "row #0 is not an object", False),
    (
        "report-host-malformed",
        _raw_report('{"host": {"cpu": [1]}, "rows": []}'),
        2,
        "is not a readable nasquant report",
        False,
    ),
    ("report-not-json", _raw_report("{"), 2, "is not a valid report.json", False),
    # recipes: values range-checked when read
    ("recipe-opset-99", _recipe("export:\n  opset: 99\n"), 2, "export.opset: must be at most 20", False),
    (
        "recipe-negative-seed",
        _recipe(calibration="  seed: -1\n"),
        2,
        "calibration.seed: must be at least 0, got -1",
        False,
    ),
    (
        "recipe-yes-is-not-true",
        _recipe(calibration="  allow_overlap: yes\n"),
        2,
        "calibration.allow_overlap: expected true or false, got 'yes'",
        False,
    ),
    (
        "recipe-alias-bomb",
        _recipe(crafted.yaml_alias_bomb().replace("val:", "name:")),
        2,
        "aliases expand",
        True,
    ),
    (
        "recipe-octal-looking-int",
        _recipe("benchmark:\n  iterations: 1:30\n"),
        2,
        "benchmark.iterations: expected an integer, got '1:30'",
        False,
    ),
    ("stages-json-corrupt", _corrupt_stages, 2, "stages.json is not JSON", False),
    # predict never replaces an input
    (
        "predict-out-is-source-folder",
        _predict_into_sources,
        2,
        "annotated images would replace inputs",
        False,
    ),
]


def _run_child(argv: list[str], cwd: Path) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "nasquant.cli", *argv],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        cwd=cwd,
    )
    return result.returncode, result.stderr


@pytest.mark.parametrize(
    ("build", "code", "fragment", "child"), [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_bad_input_ends_in_one_line(
    build: Case, code: int, fragment: str, child: bool, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = [part.replace("DATA", _val()) for part in build(tmp_path)]
    before = _snapshot(tmp_path)
    if child:
        returned, stderr = _run_child(argv, tmp_path)
    else:
        returned = main(argv)
        stderr = capsys.readouterr().err
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nasquant"), stderr
    assert fragment in lines[0], lines[0]
    assert returned == code, lines[0]
    assert _snapshot(tmp_path) == before, "an input was modified or a file was written"


def test_report_shows_invalid_values_and_passes_without_a_gate(tmp_path: Path, capsys) -> None:
    crafted.report_json(tmp_path / "run" / "report.json", float("nan"))
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "| ORT INT8 | onnxruntime | int8 | invalid |" in capsys.readouterr().out


def test_sigterm_ends_like_ctrl_c_with_one_line() -> None:
    # A million timed runs would take hours: terminated once its progress bar shows it is running.
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nasquant.cli",
            "bench",
            "--model",
            _pt(),
            "--warmup",
            "0",
            "--iterations",
            "1000000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = ""
    while "bench torch" not in seen:
        character = process.stderr.read(1)
        assert character, f"the benchmark ended before it was terminated: {seen}"
        seen += character
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=DEADLINE_S)
    stderr = seen + rest
    assert process.returncode == EXIT_TERMINATED == 143
    assert "Traceback" not in stderr
    # The progress bar shares stderr; after it, one line.
    assert [line for line in stderr.splitlines() if line.startswith("nasquant")] == ["nasquant: terminated"]
    assert stderr.rstrip().endswith("nasquant: terminated")


_ATOMIC_WRITER = """
import sys, time
from pathlib import Path
from nasquant.cli import _sigterm_raises, _Terminated
from nasquant.io import atomic_path
try:
    with _sigterm_raises(), atomic_path(Path(sys.argv[1])) as tmp:
        tmp.write_text("half of an artifact")
        print("writing", flush=True)
        time.sleep(60)
except _Terminated:
    sys.exit(143)
"""


def test_sigterm_removes_the_file_being_written(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", _ATOMIC_WRITER, str(tmp_path / "model.onnx")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "writing"
    assert len(list(tmp_path.glob(".model.onnx.*.part"))) == 1
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=DEADLINE_S) == 143
    assert list(tmp_path.iterdir()) == []


def _file_size_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:
        # Writing past RLIMIT_FSIZE fails with EFBIG once SIGXFSZ is ignored: a disk that fills up.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_while_saving_the_calibration_is_one_line(tmp_path: Path) -> None:
    argv = _recipe(calibration="  num_images: 8\n")(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "nasquant.cli", *argv],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S * 3,
        preexec_fn=_file_size_limit(20_000),  # the recipe and lists fit, calibration.safetensors does not
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("nasquant")]
    assert "calibration.safetensors" in line and "File too large" in line
    # What the run knew before the failed write, each file complete; no partial calibration.
    written = sorted(path.name for path in (tmp_path / "run").iterdir())
    assert written == ["calibration_images.txt", "recipe.resolved.yaml", "timings.json"]
