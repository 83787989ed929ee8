"""What a benchmark ran on, and the thread settings that shape its numbers.

Latency without the machine next to it is meaningless, so every report carries :func:`host_info`.
Package versions come from installed metadata, never from importing: importing TensorRT just to
print a version can take seconds, or fail on a driver mismatch.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import cv2
import torch

from nasquant.errors import NasquantError

#: report key -> distribution names that provide it, first installed one wins
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "nasquant": ("nasquant",),
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "onnx": ("onnx",),
    "modelopt": ("nvidia-modelopt",),
    "numpy": ("numpy",),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"),
    "openvino": ("openvino",),
    "opencv": ("opencv-python-headless", "opencv-python", "opencv-contrib-python"),
}

_SUBPROCESS_TIMEOUT_S = 10


def package_version(*distributions: str) -> str | None:
    """The version of the first installed distribution among ``distributions``, or ``None``."""
    for name in distributions:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def _command_output(*args: str) -> str | None:
    if shutil.which(args[0]) is None:
        return None
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=_SUBPROCESS_TIMEOUT_S, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _cpu_model() -> str:
    if sys.platform == "darwin":
        brand = _command_output("sysctl", "-n", "machdep.cpu.brand_string")
        if brand:
            return brand
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(errors="replace"), re.MULTILINE)
        if match:
            return match.group(1).strip()
    # ARM boards (Jetson, Raspberry Pi) have no "model name" line; the device tree names the board.
    board = Path("/proc/device-tree/model")
    if board.is_file():
        return board.read_bytes().rstrip(b"\0").decode(errors="replace").strip()
    return platform.processor() or platform.machine()


def _physical_cores() -> int | None:
    if sys.platform == "darwin":
        count = _command_output("sysctl", "-n", "hw.physicalcpu")
        return int(count) if count and count.isdigit() else None
    # One core per distinct (package, core) pair; works on x86 and ARM alike, unlike /proc/cpuinfo.
    cores = set()
    for topology in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            continue
        cores.add((package, core))
    return len(cores) or None


def _usable_cpus() -> int | None:
    # Containers and taskset restrict the CPUs a process may use below os.cpu_count().
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def _gpus() -> list[dict[str, Any]]:
    """NVIDIA GPUs: name, driver, the CUDA version the driver supports, memory in MiB."""
    listing = _command_output(
        "nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"
    )
    if listing:
        header = _command_output("nvidia-smi") or ""
        cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
        gpus = []
        for line in listing.splitlines():
            name, driver, memory = (field.strip() for field in line.rsplit(",", 2))
            gpus.append(
                {
                    "name": name,
                    "driver": driver,
                    "cuda": cuda.group(1) if cuda else None,
                    "memory_mib": int(memory) if memory.isdigit() else None,
                }
            )
        return gpus
    # No nvidia-smi (e.g. some Jetson images): a CUDA build of torch still sees the devices.
    if torch.cuda.is_available():
        return [
            {
                "name": torch.cuda.get_device_name(index),
                "driver": None,
                "cuda": torch.version.cuda,
                "memory_mib": torch.cuda.get_device_properties(index).total_memory // 2**20,
            }
            for index in range(torch.cuda.device_count())
        ]
    return []


def _onnxruntime_providers() -> list[str] | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return list(onnxruntime.get_available_providers())


def host_info(*, ort_threads: int | None = None) -> dict[str, Any]:
    """The machine, the software versions and the thread settings, as a JSON-ready dict.

    ``ort_threads`` is the intra-op thread count given to the ONNX Runtime sessions (ORT has no
    process-wide setting); ``None`` records ORT's default, one thread per physical core.
    """
    versions = {key: package_version(*names) for key, names in _DISTRIBUTIONS.items()}
    versions["torch_cuda"] = torch.version.cuda
    return {
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu": {
            "model": _cpu_model(),
            "logical_cores": os.cpu_count(),
            "physical_cores": _physical_cores(),
            "usable_cores": _usable_cpus(),
        },
        "gpus": _gpus(),
        "versions": versions,
        "onnxruntime_providers": _onnxruntime_providers(),
        "threads": {
            "torch": torch.get_num_threads(),
            "torch_interop": torch.get_num_interop_threads(),
            "opencv": cv2.getNumThreads(),
            "onnxruntime": ort_threads,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
    }


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads for torch inference and OpenCV preprocessing; ``None`` keeps the defaults.

    ONNX Runtime sessions take their thread count from ``SessionOptions.intra_op_num_threads`` when
    they are created, so pass the same number to the ONNX Runtime backend (and to ``host_info``).
    torch's inter-op pool is left alone: it can only be sized before its first use.
    """
    if threads is None:
        return
    if threads < 1:
        raise NasquantError(f"thread count must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
