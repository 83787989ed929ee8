from __future__ import annotations

import copy
import math

import pytest

from nasquant.errors import NasquantError
from nasquant.report import ReportRow, artifact_size_mb, check_drop, finalize_rows


def _by_name(rows: list[ReportRow]) -> dict[str, ReportRow]:
    return {row.name: row for row in rows}


def test_finalize_fills_delta_vs_torch_fp32_and_speedup_vs_same_backend_fp32(rows: list[ReportRow]) -> None:
    original = copy.deepcopy(rows)
    done = _by_name(finalize_rows(rows))
    assert rows == original  # the inputs are left alone

    torch_fp32 = 0.4750
    assert done["torch FP32"].delta_map50_95 == 0.0
    assert done["ORT FP32"].delta_map50_95 == 0.4749 - torch_fp32
    assert done["ORT INT8 selective"].delta_map50_95 == 0.4729 - torch_fp32
    assert done["ORT INT8 all-layers"].delta_map50_95 == 0.4610 - torch_fp32
    assert done["TRT INT8 (GPU box)"].delta_map50_95 == 0.4700 - torch_fp32
    assert done["ORT INT8 selective"].extra["delta_reference"] == "torch FP32"

    # ORT INT8 is compared with ORT FP32 (100 ms), never with torch FP32 (120 ms).
    assert done["torch FP32"].speedup == 1.0
    assert done["ORT FP32"].speedup == 1.0
    assert done["ORT INT8 selective"].speedup == 100.0 / 40.0
    assert done["ORT INT8 all-layers"].speedup == 100.0 / 32.0
    assert done["ORT INT8 all-layers"].extra["speedup_reference"] == "ORT FP32"
    # No TensorRT FP32 row: no speedup, and a note saying why.
    assert done["TRT INT8 (GPU box)"].speedup is None
    assert done["TRT INT8 (GPU box)"].extra["speedup_note"] == "no fp32 tensorrt row to compare with"

    for name in ("TRT FP16", "TRT INT8"):
        row = done[name]
        assert row.skipped and not row.ok and row.delta_map50_95 is None and row.speedup is None
        assert row.extra == {}
    assert done["TRT INT8"].skip_reason == "no CUDA device"
    assert done["torch FP32"].extra["map75"] == 0.52
    assert finalize_rows(list(done.values())) == list(done.values())  # idempotent


def test_reference_is_the_first_fp32_row_without_torch_and_none_without_fp32() -> None:
    rows = [
        ReportRow("ORT INT8", "onnxruntime", "int8", map50_95=0.40, p50_ms=10.0),
        ReportRow.skipped_row("torch FP32", "torch", "fp32", "not measured"),
        ReportRow("ORT FP32", "onnxruntime", "fp32", map50_95=0.42, p50_ms=30.0),
        ReportRow("ORT FP32 again", "onnxruntime", "fp32", map50_95=0.43, p50_ms=35.0),
    ]
    done = _by_name(finalize_rows(rows))
    assert done["ORT INT8"].delta_map50_95 == 0.40 - 0.42
    assert done["ORT FP32 again"].delta_map50_95 == 0.43 - 0.42
    assert done["ORT INT8"].speedup == 30.0 / 10.0

    alone = finalize_rows([ReportRow("ORT INT8", "onnxruntime", "int8", map50_95=0.40)])
    assert alone[0].delta_map50_95 is None and alone[0].speedup is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"status": "failed"}, "status must be 'ok' or 'skipped: <reason>'"),
        ({"status": "skipped: "}, "status must be 'ok' or 'skipped: <reason>'"),
        ({"status": "skipped: no GPU", "p50_ms": 3.0}, "has a measured p50_ms"),
        ({"map50_95": math.nan}, "map50_95 must be a finite number"),
        ({"speedup": math.inf}, "speedup must be a finite number"),
    ],
)
def test_malformed_rows_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReportRow("x", "onnxruntime", "int8", **kwargs)


def _report(int8_map: float | None, *, status: str = "ok", fp32_map: float = 0.475) -> dict:
    rows = [ReportRow("torch FP32", "torch", "fp32", map50_95=fp32_map)]
    if status == "ok":
        rows.append(ReportRow("ORT INT8", "onnxruntime", "int8", map50_95=int8_map))
    else:
        rows.append(ReportRow("ORT INT8", "onnxruntime", "int8", status=status))
    return {"rows": [row.to_dict() for row in finalize_rows(rows)]}


def test_check_drop_threshold_boundary_in_points() -> None:
    report = _report(0.470)  # 0.5 points below FP32 (-0.0050000000000000044 as floats)
    assert check_drop(report, 0.5) == []
    assert check_drop(report, 0.6) == []
    (failure,) = check_drop(report, 0.49)
    assert failure == "ORT INT8: mAP50-95 dropped 0.50 points vs FP32 (allowed 0.49)"
    assert check_drop(_report(0.480), 0.0) == []  # INT8 better than FP32 never fails


def test_check_drop_skipped_missing_reference_and_nothing_to_check() -> None:
    both = {"rows": _report(0.470)["rows"] + _report(None, status="skipped: no CUDA device")["rows"][1:]}
    assert check_drop(both, 0.5) == []  # the skipped TensorRT INT8 row is not a failure

    assert check_drop(_report(None, status="skipped: no CUDA device"), 0.5) == [
        "no INT8 row with a measured mAP50-95 in the report: nothing to check"
    ]
    unreferenced = {"rows": [ReportRow("ORT INT8", "onnxruntime", "int8", map50_95=0.47).to_dict()]}
    assert check_drop(unreferenced, 0.5) == [
        "ORT INT8: no FP32 reference row to measure its mAP drop against"
    ]
    with pytest.raises(NasquantError, match="maximum mAP drop must be a number of points >= 0"):
        check_drop(_report(0.470), -0.1)


@pytest.mark.parametrize(
    ("change", "failure"),
    [
        ({"map50_95": float("nan")}, "ORT INT8: mAP50-95 is nan, not a measured number"),
        ({"map50_95": None}, "ORT INT8: mAP50-95 is missing, not a measured number"),
        ({"map50_95": "0.47"}, "ORT INT8: mAP50-95 is '0.47', not a measured number"),
        ({"map50_95": True}, "ORT INT8: mAP50-95 is True, not a measured number"),
        ({"delta_map50_95": float("-inf")}, "ORT INT8: its mAP drop vs FP32 is -inf, not a number"),
        ({"delta_map50_95": [0]}, "ORT INT8: its mAP drop vs FP32 is a list, not a number"),
        (
            {"status": "failed: build crashed"},
            "ORT INT8: the row is marked 'failed: build crashed', not measured",
        ),
        ({"status": None}, "ORT INT8: the row is marked None, not measured"),
    ],
)
def test_the_gate_fails_closed_on_what_it_cannot_read(change: dict, failure: str) -> None:
    # A report.json edited by hand, written by another tool or a broken run: never a silent pass.
    report = _report(0.479)
    report["rows"][1].update(change)
    assert check_drop(report, 0.5) == [failure]


def test_artifact_size_of_a_file_and_of_a_folder(tmp_path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\0" * 1_500_000)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.onnx.data").write_bytes(b"\0" * 500_000)
    assert artifact_size_mb(tmp_path / "model.onnx") == 1.5
    assert artifact_size_mb(tmp_path) == 2.0
    with pytest.raises(NasquantError, match="artifact not found"):
        artifact_size_mb(tmp_path / "missing.engine")


def test_a_paired_measurement_is_the_speedup_the_report_states(rows: list[ReportRow]) -> None:
    from dataclasses import replace

    paired = [
        replace(row, extra={**row.extra, "speedup_paired": 2.5}) if row.name == "ORT INT8 selective" else row
        for row in rows
    ]
    done = _by_name(finalize_rows(paired))
    fp32 = done["ORT FP32"].p50_ms
    assert done["ORT INT8 selective"].speedup == 2.5
    assert done["ORT INT8 selective"].extra["speedup_method"] == "paired"
    assert done["ORT INT8 all-layers"].speedup == fp32 / done["ORT INT8 all-layers"].p50_ms
    assert done["ORT INT8 all-layers"].extra["speedup_method"] == "p50"
    assert finalize_rows(finalize_rows(paired)) == finalize_rows(paired)  # still idempotent
