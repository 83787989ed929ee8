"""The engine sidecar: round trip, unreadable files, and the one-line refusal on the wrong machine."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from nasquant.artifacts import EngineSidecar, TensorSpec, file_sha256, sidecar_path
from nasquant.errors import NasquantError


@pytest.fixture
def engine(tmp_path: Path) -> tuple[Path, EngineSidecar]:
    """A file standing in for a serialized engine (the sidecar only hashes it) and its sidecar."""
    path = tmp_path / "model.int8.engine"
    path.write_bytes(b"serialized engine bytes")
    sidecar = EngineSidecar(
        tensorrt_version="10.3.0",
        gpu_name="Tesla T4",
        compute_capability="7.5",
        precision="int8",
        typing="weak",
        hardware_compatibility="none",
        inputs=[TensorSpec("images", [-1, 3, 640, 640], "float32")],
        outputs=[
            TensorSpec("boxes", [-1, 8400, 4], "float32"),
            TensorSpec("scores", [-1, 8400, 80], "float32"),
        ],
        onnx_sha256="0" * 64,
        engine_sha256=file_sha256(path),
        profile={
            "input": "images",
            "min": [1, 3, 640, 640],
            "opt": [4, 3, 640, 640],
            "max": [8, 3, 640, 640],
        },
        class_names=["person", "bicycle"],
        input_size=640,
        protocol="sg",
        preprocess={"imgsz": 640, "resize": 636, "pad_value": 114, "rounding": "floor"},
        onnx_metadata={"nasquant.variant": "yolo_nas_s"},
        nasquant_version="0.1.0",
    )
    sidecar.write(path)
    return path, sidecar


def test_the_sidecar_round_trips_beside_the_engine(engine: tuple[Path, EngineSidecar]) -> None:
    path, sidecar = engine
    assert sidecar_path(path) == path.with_name("model.int8.engine.json")
    assert EngineSidecar.read(path) == sidecar
    # plain JSON a C++ consumer can read
    raw = json.loads(sidecar_path(path).read_text())
    assert raw["inputs"][0] == {"name": "images", "shape": [-1, 3, 640, 640], "dtype": "float32"}


def test_unreadable_sidecars_are_one_clear_error(engine: tuple[Path, EngineSidecar], tmp_path: Path) -> None:
    path, _ = engine
    with pytest.raises(NasquantError, match="no sidecar beside the engine"):
        EngineSidecar.read(tmp_path / "other.engine")
    side = sidecar_path(path)
    side.write_text("{not json")
    with pytest.raises(NasquantError, match="not a readable engine sidecar"):
        EngineSidecar.read(path)
    side.write_text(json.dumps({"tensorrt_version": "10.3.0"}))
    with pytest.raises(NasquantError, match="lacks compute_capability, engine_sha256"):
        EngineSidecar.read(path)


def test_an_engine_runs_only_where_the_sidecar_says_it_can(engine: tuple[Path, EngineSidecar]) -> None:
    path, sidecar = engine
    here = {"tensorrt_version": "10.3.0", "gpu_name": "Tesla T4", "compute_capability": "7.5"}
    sidecar.check_runtime(path, **here)
    with pytest.raises(
        NasquantError, match=r"built with TensorRT 10.3.0 on Tesla T4 .*this machine has TensorRT 10.8.0"
    ):
        sidecar.check_runtime(path, **{**here, "tensorrt_version": "10.8.0"})
    with pytest.raises(NasquantError, match="without hardware compatibility"):
        sidecar.check_runtime(path, **{**here, "gpu_name": "NVIDIA A10G", "compute_capability": "8.6"})
    path.write_bytes(b"another engine")
    with pytest.raises(NasquantError, match="does not match its sidecar"):
        sidecar.check_runtime(path, **here)


@pytest.mark.parametrize(
    ("level", "built", "here", "runs"),
    [
        ("none", "8.6", "8.6", True),
        ("none", "8.6", "8.9", False),
        ("ampere_plus", "8.0", "8.9", True),
        ("ampere_plus", "8.0", "9.0", True),
        ("ampere_plus", "8.6", "7.5", False),  # a T4 is not Ampere
        ("same_compute_capability", "8.6", "8.6", True),
        ("same_compute_capability", "8.6", "8.7", False),
    ],
)
def test_hardware_compatibility_levels(
    engine: tuple[Path, EngineSidecar], level: str, built: str, here: str, runs: bool
) -> None:
    _, sidecar = engine
    assert replace(sidecar, hardware_compatibility=level, compute_capability=built).runs_on(here) is runs
