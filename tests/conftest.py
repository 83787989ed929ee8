from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from nasquant import NAS
from nasquant.artifacts import KEY_FLAVOR
from nasquant.data.calibration import select_calibration_images
from nasquant.data.datasets import iter_batches, load_dataset
from nasquant.export import export_onnx, write_cpu_flavor
from tests.shared import shared_path

# No network from the tests: OpenVINO's converter sends usage telemetry to Intel unless it sees a CI
# run (or the user opted out with `opt_in_out --opt_out`). Set before any test imports openvino.
os.environ.setdefault("CI", "true")


class _RunsCommandWhenUnpickled:
    """Unpickling this calls os.system: the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def malicious_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A torch-format .pt whose pickle would create ``marker`` if anything executed it."""
    marker = tmp_path / "pwned"
    path = tmp_path / "yolo_nas_s.pt"
    torch.save({"net": _RunsCommandWhenUnpickled(marker)}, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    return path, marker


@pytest.fixture(scope="session")
def shapes_pt() -> Path:
    return shared_path("fixtures", "yolo_nas_s_shapes.pt")


@pytest.fixture(scope="session")
def shapes_safetensors() -> Path:
    return shared_path("fixtures", "yolo_nas_s_shapes.safetensors")


# ONNX files of the shapes fixture shared by the export and runtime tests: one calibration, exported once.
IMGSZ = 320


@pytest.fixture(scope="session")
def shapes_nas() -> NAS:
    return NAS(shared_path("fixtures", "yolo_nas_s_shapes.pt")).fuse()


@pytest.fixture(scope="session")
def calibrated(shapes_nas: NAS) -> torch.nn.Module:
    from nasquant.quant import calibrate  # ModelOpt: imported by the tests that calibrate, not by all

    chosen = select_calibration_images(load_dataset(shared_path("data", "shapes", "calib")), num_images=16)
    batches = [batch.images for batch in iter_batches(chosen, shapes_nas.preprocessing(), 8)]
    return calibrate(shapes_nas.model, batches, method="max", progress=False)


@pytest.fixture(scope="session")
def flavors(calibrated: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The INT8 graph in both flavours (dynamic batch), from one calibration."""
    folder = tmp_path_factory.mktemp("int8")
    trt = export_onnx(
        calibrated,
        folder / "model.int8.trt.onnx",
        imgsz=IMGSZ,
        dynamic_batch=True,
        metadata={KEY_FLAVOR: "trt"},
    )
    return {"trt": trt, "cpu": write_cpu_flavor(trt, folder / "model.int8.cpu.onnx")}


@pytest.fixture(scope="session")
def fp32_onnx(shapes_nas: NAS, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FP32 graph with a fixed batch of 1, with nasquant's metadata (names, preprocessing, ...)."""
    return shapes_nas.export(tmp_path_factory.mktemp("fp32") / "model.fp32.onnx", imgsz=IMGSZ)
