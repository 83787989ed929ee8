from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nasquant.errors import NasquantError
from nasquant.report import ReportRow, check_drop, compare_reports, finalize_rows, load_report, write_report
from tests.report.conftest import HOST, RECIPE

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

ROW_KEYS = [
    "name",
    "backend",
    "precision",
    "flavor",
    "skipped_layers",
    "map50_95",
    "map50",
    "delta_map50_95",
    "p50_ms",
    "p90_ms",
    "images_per_s",
    "speedup",
    "size_mb",
    "status",
    "extra",
]
NUMERIC_KEYS = [
    "map50_95",
    "map50",
    "delta_map50_95",
    "p50_ms",
    "p90_ms",
    "images_per_s",
    "speedup",
    "size_mb",
]


def _write(
    run_dir: Path, rows: list[ReportRow], title: str = "YOLO-NAS-S shapes: FP32 vs INT8"
) -> dict[str, Path]:
    return write_report(run_dir, recipe=RECIPE, host=HOST, rows=rows, title=title)


def test_report_json_follows_the_contract(tmp_path: Path, rows: list[ReportRow]) -> None:
    paths = _write(tmp_path / "run", rows)
    assert set(paths) == {"md", "json", "png"}
    assert all(path.is_file() and path.parent == tmp_path / "run" for path in paths.values())
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "accuracy_latency.png",
        "report.json",
        "report.md",
    ]  # no temporary files left behind

    report = json.loads(paths["json"].read_text())
    assert list(report) == ["recipe", "host", "rows"]
    assert report["recipe"] == RECIPE and report["host"] == HOST
    assert [row["name"] for row in report["rows"]] == [row.name for row in rows]
    expected = [row.to_dict() for row in finalize_rows(rows)]
    assert report["rows"] == expected
    for row in report["rows"]:
        assert list(row) == ROW_KEYS
        assert row["status"] == "ok" or row["status"].startswith("skipped: ")
        if row["status"] != "ok":
            assert all(row[key] is None for key in NUMERIC_KEYS)
    by_name = {row["name"]: row for row in report["rows"]}
    assert by_name["torch FP32"]["map50_95"] == 0.4750  # fractions, not percentages
    assert by_name["ORT INT8 selective"]["delta_map50_95"] == 0.4729 - 0.4750
    assert by_name["ORT INT8 selective"]["speedup"] == 2.5
    assert by_name["TRT FP16"]["status"] == "skipped: tensorrt not installed"
    assert load_report(tmp_path / "run") == report == load_report(paths["json"])


def test_report_markdown_shows_table_layers_and_skip_reasons(tmp_path: Path, rows: list[ReportRow]) -> None:
    text = _write(tmp_path, rows)["md"].read_text()
    lines = text.splitlines()
    assert lines[0] == "# YOLO-NAS-S shapes: FP32 vs INT8"
    assert lines[2].startswith("Host: edge-box · Linux-6.8-x86_64 · Test CPU 9000 (8 cores / 16 threads)")
    assert (
        "| artifact | backend | precision | mAP50-95 | mAP50 | ΔmAP vs FP32 | p50 ms | p90 ms | img/s |"
        in text
    )
    assert (
        "| torch FP32 | torch | fp32 | 47.50 | 64.10 | +0.00 | 120.00 | 131.00 | 8.3 | 1.00× | 76.2 | ok |"
        in lines
    )
    assert (
        "| ORT INT8 selective | onnxruntime | int8 (cpu) | 47.29 | 63.90 | -0.21 | 40.00 | 44.00 | 25.0 | 2.50× "
        "| 20.1 | ok |" in lines
    )
    assert "| TRT FP16 | tensorrt | fp16 | — | — | — | — | — | — | — | — | skipped |" in lines
    assert "- **ORT INT8 selective** (cpu): `backbone.stem.conv`, `heads.head1.reg_pred`" in lines
    assert "- **ORT INT8 all-layers**: none (every quantizable layer is INT8)" in lines
    assert "Latency: model-only `run()` on a 1×3×640² input, 50 timed calls after 10 warm-up;" in text
    assert "ΔmAP in mAP points vs **torch FP32**" in text
    assert "- **TRT FP16**: tensorrt not installed" in lines
    assert "- **TRT INT8**: no CUDA device" in lines
    assert "- **TRT INT8 (GPU box)**: speedup not computed, no fp32 tensorrt row to compare with" in lines


def test_plot_is_a_png_drawn_without_a_display_or_pyplot(tmp_path: Path) -> None:
    # A fresh interpreter with no display and an interactive backend requested. Drawing on an explicit
    # Agg canvas never resolves a backend at all: pyplot (which would) must stay unimported.
    script = textwrap.dedent(
        f"""
        import sys
        from nasquant.report import ReportRow, write_report
        rows = [
            ReportRow("torch FP32", "torch", "fp32", map50_95=0.475, p50_ms=120.0),
            ReportRow("ORT INT8", "onnxruntime", "int8", map50_95=0.47, p50_ms=3.0),
            ReportRow("odd", "openvino", "int4", map50_95=0.41, p50_ms=2.0),
        ]
        write_report({str(tmp_path)!r}, recipe={{}}, host={{}}, rows=rows, title="t")
        assert "matplotlib.pyplot" not in sys.modules
        assert not any(name.startswith("matplotlib.backends.backend_tk") for name in sys.modules)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["MPLBACKEND"] = "TkAgg"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    png = (tmp_path / "accuracy_latency.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000


def test_empty_report_still_writes_valid_files(tmp_path: Path) -> None:
    paths = write_report(tmp_path, recipe={}, host={}, rows=[], title="nothing measured")
    assert paths["png"].read_bytes().startswith(PNG_SIGNATURE)
    assert json.loads(paths["json"].read_text()) == {"recipe": {}, "host": {}, "rows": []}
    assert "Host: unknown host" in paths["md"].read_text()


def test_compare_reports_side_by_side(tmp_path: Path, rows: list[ReportRow]) -> None:
    _write(tmp_path / "before", rows)
    after = [
        ReportRow("torch FP32", "torch", "fp32", map50_95=0.4750, p50_ms=60.0),
        ReportRow("ORT INT8 selective", "onnxruntime", "int8", map50_95=0.4740, p50_ms=30.0),
        ReportRow("ORT INT8 percentile", "onnxruntime", "int8", map50_95=0.4745, p50_ms=31.0),
    ]
    _write(tmp_path / "after", after)
    text = compare_reports([tmp_path / "before", tmp_path / "after"])
    lines = text.splitlines()
    assert f"| #1 | `{tmp_path / 'before'}` | edge-box · " in text
    assert f"| #2 | `{tmp_path / 'after'}` | edge-box · " in text
    assert "| artifact | mAP50-95 #1 | mAP50-95 #2 | ΔmAP #2 | p50 ms #1 | p50 ms #2 | Δp50 #2 |" in lines
    assert "| torch FP32 | 47.50 | 47.50 | +0.00 | 120.00 | 60.00 | -50.0% |" in lines
    assert "| ORT INT8 selective | 47.29 | 47.40 | +0.11 | 40.00 | 30.00 | -25.0% |" in lines
    assert "| ORT FP32 | 47.49 | — | — | 100.00 | — | — |" in lines  # only in the first run
    assert "| ORT INT8 percentile | — | 47.45 | — | — | 31.00 | — |" in lines  # only in the second
    assert "| TRT FP16 | skipped | — | — | skipped | — | — |" in lines


def test_bad_report_inputs_are_clear_errors(tmp_path: Path, rows: list[ReportRow]) -> None:
    with pytest.raises(NasquantError, match="report not found"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(NasquantError, match="is not a valid report.json"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text('{"rows": 3}')
    with pytest.raises(NasquantError, match="is not a nasquant report"):
        load_report(tmp_path / "report.json")
    _write(tmp_path / "one", rows)
    with pytest.raises(NasquantError, match="at least two runs, got 1"):
        compare_reports([tmp_path / "one"])


def test_written_report_passes_and_fails_the_ci_gate(tmp_path: Path, rows: list[ReportRow]) -> None:
    report = load_report(_write(tmp_path, rows)["json"])
    # Worst INT8 row: all-layers, 1.40 points below torch FP32.
    assert check_drop(report, 1.4) == []
    assert check_drop(report, 1.39) == [
        "ORT INT8 all-layers: mAP50-95 dropped 1.40 points vs FP32 (allowed 1.39)"
    ]
