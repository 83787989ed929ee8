from __future__ import annotations

import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version

import cv2
import pytest
import torch

from nasquant.bench import host_info, package_version, set_threads
from nasquant.errors import NasquantError


def _installed(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def test_host_info_describes_machine_versions_and_threads() -> None:
    tensorrt_was_imported = "tensorrt" in sys.modules
    info = host_info(ort_threads=3)
    assert json.loads(json.dumps(info)) == info  # plain JSON values only
    assert set(info) == {
        "hostname",
        "os",
        "machine",
        "python",
        "cpu",
        "gpus",
        "versions",
        "onnxruntime_providers",
        "threads",
    }
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert set(info["cpu"]) == {"model", "logical_cores", "physical_cores", "usable_cores"}
    assert info["cpu"]["model"] and info["cpu"]["logical_cores"] >= 1
    assert (
        info["cpu"]["physical_cores"] is None
        or 1 <= info["cpu"]["physical_cores"] <= info["cpu"]["logical_cores"]
    )
    versions = info["versions"]
    assert versions["torch"] == version("torch") == torch.__version__
    assert versions["numpy"] == version("numpy")
    assert versions["onnx"] == version("onnx")
    assert versions["onnxruntime"] == (_installed("onnxruntime") or _installed("onnxruntime-gpu"))
    assert versions["modelopt"] == _installed("nvidia-modelopt")
    assert versions["tensorrt"] == _installed("tensorrt")
    assert versions["torch_cuda"] == torch.version.cuda
    assert "CPUExecutionProvider" in info["onnxruntime_providers"]
    for gpu in info["gpus"]:
        assert set(gpu) == {"name", "driver", "cuda", "memory_mib"} and gpu["name"]
    if torch.cuda.is_available():
        assert info["gpus"]
    assert info["threads"]["torch"] == torch.get_num_threads()
    assert info["threads"]["onnxruntime"] == 3
    # Versions are read from metadata: describing the host never imports TensorRT.
    assert ("tensorrt" in sys.modules) == tensorrt_was_imported


def test_package_version_takes_the_first_installed_distribution() -> None:
    assert package_version("surely-not-installed-nasquant-dist", "numpy") == version("numpy")
    assert package_version("surely-not-installed-nasquant-dist") is None


def test_set_threads_sets_torch_and_opencv_and_none_keeps_them() -> None:
    before = torch.get_num_threads(), cv2.getNumThreads()
    try:
        set_threads(1)
        assert (torch.get_num_threads(), cv2.getNumThreads()) == (1, 1)
        set_threads(None)
        assert (torch.get_num_threads(), cv2.getNumThreads()) == (1, 1)
        with pytest.raises(NasquantError, match="thread count must be at least 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])


def test_gpus_are_read_from_nvidia_smi(tmp_path, monkeypatch) -> None:
    # No GPU is needed to check the parsing: a stand-in nvidia-smi answers both queries.
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        "  --query-gpu=*) printf 'NVIDIA H100 80GB HBM3, 550.54.15, 81559\\nNVIDIA T4, 550.54.15, [N/A]\\n' ;;\n"
        "  *) echo '| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4 |' ;;\n"
        "esac\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert host_info()["gpus"] == [
        {"name": "NVIDIA H100 80GB HBM3", "driver": "550.54.15", "cuda": "12.4", "memory_mib": 81559},
        {"name": "NVIDIA T4", "driver": "550.54.15", "cuda": "12.4", "memory_mib": None},
    ]
