from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from tests.shared import shared_path


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
