from __future__ import annotations

import pytest

from nasquant.report import ReportRow

HOST = {
    "hostname": "edge-box",
    "os": "Linux-6.8-x86_64",
    "machine": "x86_64",
    "python": "3.11.7",
    "cpu": {"model": "Test CPU 9000", "logical_cores": 16, "physical_cores": 8, "usable_cores": 16},
    "gpus": [],
    "versions": {"torch": "2.13.0+cpu", "onnxruntime": "1.32.0", "tensorrt": None},
    "threads": {"torch": 8, "onnxruntime": None},
}

RECIPE = {"variant": "yolo_nas_s", "imgsz": 640, "calibration": {"images": 512, "method": "max"}}


@pytest.fixture
def rows() -> list[ReportRow]:
    """A typical CPU-only run: torch and ORT measured, TensorRT rows skipped, one odd TRT row."""
    return [
        ReportRow(
            "torch FP32",
            "torch",
            "fp32",
            map50_95=0.4750,
            map50=0.6410,
            p50_ms=120.0,
            p90_ms=131.0,
            images_per_s=8.3,
            size_mb=76.2,
            extra={
                "map75": 0.52,
                "bench_batch": 1,
                "bench_imgsz": 640,
                "bench_iterations": 50,
                "bench_warmup": 10,
            },
        ),
        ReportRow(
            "ORT FP32",
            "onnxruntime",
            "fp32",
            map50_95=0.4749,
            map50=0.6409,
            p50_ms=100.0,
            p90_ms=104.0,
            images_per_s=10.0,
            size_mb=76.0,
        ),
        ReportRow(
            "ORT INT8 selective",
            "onnxruntime",
            "int8",
            flavor="cpu",
            skipped_layers=["backbone.stem.conv", "heads.head1.reg_pred"],
            map50_95=0.4729,
            map50=0.6390,
            p50_ms=40.0,
            p90_ms=44.0,
            images_per_s=25.0,
            size_mb=20.1,
        ),
        ReportRow(
            "ORT INT8 all-layers",
            "onnxruntime",
            "int8",
            map50_95=0.4610,
            map50=0.6300,
            p50_ms=32.0,
            p90_ms=35.0,
            images_per_s=31.25,
            size_mb=19.5,
        ),
        ReportRow("TRT INT8 (GPU box)", "tensorrt", "int8", map50_95=0.4700, map50=0.6350, p50_ms=2.5),
        ReportRow.skipped_row("TRT FP16", "tensorrt", "fp16", "tensorrt not installed"),
        ReportRow.skipped_row("TRT INT8", "tensorrt", "int8", "no CUDA device", flavor="gpu"),
    ]
