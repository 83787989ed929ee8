from __future__ import annotations

import numpy as np
import pytest
import torch

from nasquant.errors import NasquantError
from nasquant.models import yolo_nas
from nasquant.runtime import Backend, TorchBackend, parse_device


@pytest.fixture(scope="module")
def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return yolo_nas("yolo_nas_s", num_classes=4).eval()


def test_run_returns_numpy_outputs_equal_to_the_module(small_model: torch.nn.Module) -> None:
    images = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    backend = TorchBackend(small_model, device="cpu")
    assert isinstance(backend, Backend)
    assert (backend.name, backend.precision, backend.device) == ("torch", "fp32", "cpu")
    boxes, scores = backend.run(images)
    with torch.no_grad():
        ref_boxes, ref_scores = small_model(torch.from_numpy(images))
    assert boxes.dtype == np.float32 and scores.shape == (2, 84, 4)
    np.testing.assert_array_equal(boxes, ref_boxes.numpy())
    np.testing.assert_array_equal(scores, ref_scores.numpy())


def test_bad_precision_and_device_are_clear_errors(small_model: torch.nn.Module) -> None:
    with pytest.raises(NasquantError, match="precision must be one of fp32, fp16"):
        TorchBackend(small_model, precision="int4")
    with pytest.raises(NasquantError, match="unknown device"):
        TorchBackend(small_model, device="tpu:7")
    if not torch.cuda.is_available():
        with pytest.raises(NasquantError, match="no CUDA device"):
            TorchBackend(small_model, device="cuda")
        with pytest.raises(NasquantError, match="fp16 inference needs a CUDA device"):
            TorchBackend(small_model, device="cpu", precision="fp16")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_matches_cpu_fp32(small_model: torch.nn.Module) -> None:
    images = np.random.default_rng(1).random((1, 3, 128, 128), dtype=np.float32)
    cpu_boxes, cpu_scores = TorchBackend(small_model, device="cpu").run(images)
    gpu_boxes, gpu_scores = TorchBackend(small_model, device="cuda", precision="fp16").run(images)
    assert next(small_model.parameters()).device.type == "cpu"  # the caller's module is untouched
    np.testing.assert_allclose(gpu_boxes, cpu_boxes, atol=0.5)
    np.testing.assert_allclose(gpu_scores, cpu_scores, atol=5e-3)


@pytest.mark.parametrize(
    ("device", "parsed"),
    [
        (None, None),
        ("", None),
        ("auto", None),
        ("cpu", ("cpu", None)),
        ("cuda", ("cuda", None)),
        ("cuda:1", ("cuda", 1)),
    ],
)
def test_parse_device(device: str | None, parsed: tuple | None) -> None:
    assert parse_device(device) == parsed


@pytest.mark.parametrize("device", ["meta", "mps", "cuda:x", "cpu:0", "cuda:-1", "CUDA", " cpu", "cuda:1:2"])
def test_only_cpu_and_cuda_devices_are_accepted(device: str) -> None:
    with pytest.raises(NasquantError, match=r"unknown device .*; use cpu, cuda or cuda:N"):
        parse_device(device)
