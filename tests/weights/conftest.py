from __future__ import annotations

import json
import sys
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.shared import shared_path

SHAPES_CLASSES = ["circle", "square", "triangle", "star", "cross", "ring"]


@pytest.fixture(autouse=True)
def _offline_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the internet or the user's cache: aliases resolve to a dead local port."""
    monkeypatch.setenv("NASQUANT_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("NASQUANT_MIRROR", "http://127.0.0.1:9")


@pytest.fixture(scope="session")
def manifest() -> dict[str, list[tuple[str, list[int], str]]]:
    """super-gradients' own state-dict layout for S/M/L (80 classes): ``{variant: [(key, shape, dtype)]}``."""
    return json.loads(shared_path("golden", "state_dict_manifest.json").read_text())


@pytest.fixture(scope="session")
def shapes_tensors() -> dict[str, torch.Tensor]:
    """The shapes fixture's tensors as stored (float16 weights, int64 counters)."""
    return load_file(shared_path("fixtures", "yolo_nas_s_shapes.safetensors"))


@pytest.fixture(scope="session")
def shapes_float32(shapes_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in shapes_tensors.items()}


def synthetic_state_dict(layout: list, num_classes: int = 80) -> dict[str, torch.Tensor]:
    """Zero tensors of the manifest's shapes (expanded views, so even L costs no memory)."""
    out = {}
    for key, shape, dtype in layout:
        if ".cls_pred." in key:
            shape = [num_classes, *shape[1:]]
        out[key] = torch.zeros((), dtype=getattr(torch, dtype)).expand(shape)
    return out


@pytest.fixture
def fake_super_gradients() -> Iterator[types.ModuleType]:
    """A throw-away ``super_gradients.demo`` module so tests can pickle "super-gradients" objects.

    pickle needs the classes importable while *saving*; the module is removed again before any
    loading, so loading proves that nothing from super-gradients is imported or needed.
    """
    assert not any(name in sys.modules for name in _FAKE_MODULES), "a real super_gradients must not be loaded"
    package = types.ModuleType("super_gradients")
    demo = types.ModuleType("super_gradients.demo")
    package.demo = demo
    sys.modules.update({"super_gradients": package, "super_gradients.demo": demo})
    try:
        yield demo
    finally:
        forget_super_gradients()


_FAKE_MODULES = ("super_gradients", "super_gradients.demo")


def forget_super_gradients() -> None:
    """Unregister the fake modules: what is loaded afterwards cannot resolve their classes."""
    for name in _FAKE_MODULES:
        sys.modules.pop(name, None)


def write_zip_pickle(path: Path, payload: bytes, folder: str = "archive") -> Path:
    """A torch-format zip around a hand-made ``data.pkl`` (no tensors needed)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{folder}/data.pkl", payload)
        archive.writestr(f"{folder}/byteorder", "little")
        archive.writestr(f"{folder}/version", "3\n")
    return path
