from __future__ import annotations

from nasquant.report import host_summary
from nasquant.report.markdown import hardware_summary, points
from tests.report.conftest import HOST


def test_host_one_liner_names_gpus_and_versions() -> None:
    gpu_host = {
        **HOST,
        "gpus": [{"name": "NVIDIA T4", "driver": "550.54.15", "cuda": "12.4", "memory_mib": 15360}],
        "versions": {**HOST["versions"], "tensorrt": "10.3.0"},
    }
    assert host_summary(gpu_host) == (
        "edge-box · Linux-6.8-x86_64 · Test CPU 9000 (8 cores / 16 threads) · "
        "NVIDIA T4 (driver 550.54.15, CUDA 12.4) · Python 3.11.7 · torch 2.13.0+cpu · "
        "onnxruntime 1.32.0 · TensorRT 10.3.0 · 8 torch threads"
    )
    assert "no CUDA GPU" in host_summary(HOST)
    assert hardware_summary(gpu_host) == "Test CPU 9000 + NVIDIA T4"
    assert (host_summary({}), hardware_summary({})) == ("unknown host", "unknown hardware")


def test_map_differences_are_signed_points() -> None:
    assert [points(d) for d in (-0.0021, 0.0, 0.013, None)] == ["-0.21", "+0.00", "+1.30", "—"]
