"""ModelOpt calibration, selective float layers and the calibration state, on the trained shapes fixture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nasquant import NAS
from nasquant.data.calibration import check_no_overlap, select_calibration_images
from nasquant.data.datasets import iter_batches, load_dataset
from nasquant.errors import NasquantError
from nasquant.eval.validate import validate
from nasquant.models.yolo_nas import Bottleneck
from nasquant.quant import (
    calibrate,
    keep_in_float,
    load_calibration,
    match_layers,
    quantized_layers,
    save_calibration,
)
from nasquant.quant.calibrate import tensor_quantizers
from nasquant.runtime import TorchBackend
from tests.shared import shared_path

SKIP = ["backbone.stem.*", "heads.head*.cls_pred", "heads.head*.reg_pred"]


@pytest.fixture(scope="module")
def nas() -> NAS:
    return NAS(shared_path("fixtures", "yolo_nas_s_shapes.pt")).fuse()


def _batches(nas: NAS, num_images: int):
    calib = select_calibration_images(
        load_dataset(shared_path("data", "shapes", "calib")), num_images=num_images
    )
    return [batch.images for batch in iter_batches(calib, nas.preprocessing(), 8)]


@pytest.fixture(scope="module")
def calibrated(nas: NAS) -> torch.nn.Module:
    return calibrate(nas.model, _batches(nas, 16), method="max", progress=False)


def test_every_conv_gets_an_input_and_a_per_channel_weight_range(
    nas: NAS, calibrated: torch.nn.Module
) -> None:
    # ModelOpt quantizes every conv and (its default) the SPP max-pools' inputs; ours, the residual Adds.
    kinds = torch.nn.Conv2d | torch.nn.ConvTranspose2d | torch.nn.MaxPool2d | Bottleneck
    assert quantized_layers(calibrated) == [n for n, m in nas.model.named_modules() if isinstance(m, kinds)]
    ranges = dict(tensor_quantizers(calibrated))
    stem_weight = ranges["backbone.stem.conv.rbr_reparam.weight_quantizer"].amax
    assert stem_weight.numel() == 48 and torch.all(stem_weight > 0)
    stem_input = ranges["backbone.stem.conv.rbr_reparam.input_quantizer"].amax
    assert stem_input.numel() == 1 and 0.9 < float(stem_input) <= 1.0  # images are in [0, 1]
    upsample_weight = ranges["neck.neck1.upsample.weight_quantizer"].amax
    assert upsample_weight.numel() == 192  # transposed conv: per *output* channel (axis 1)


def test_residual_adds_get_both_operands_quantized(nas: NAS, calibrated: torch.nn.Module) -> None:
    bottlenecks = [n for n, m in nas.model.named_modules() if isinstance(m, Bottleneck)]
    assert len(bottlenecks) == 20  # YOLO-NAS-S
    ranges = {name: float(q.amax) for name, q in tensor_quantizers(calibrated) if q.amax.numel() == 1}
    for name in bottlenecks:
        assert ranges[f"{name}.branch_quantizer"] > 0
        # The residual is the tensor cv1 reads: same data, same range, so one int8 tensor serves both.
        cv1 = next(k for k in ranges if k.startswith(f"{name}.cv1.") and k.endswith("input_quantizer"))
        assert ranges[f"{name}.residual_quantizer"] == ranges[cv1]
    skipped, layers = keep_in_float(calibrated, [bottlenecks[0]])
    assert layers == [bottlenecks[0]]
    disabled = {n for n, _ in tensor_quantizers(calibrated)} - {n for n, _ in tensor_quantizers(skipped)}
    # Keeping a block in floating point keeps everything inside it: its Add operands and its two convs.
    inside = {n for n, _ in tensor_quantizers(calibrated) if n.startswith(f"{bottlenecks[0]}.")}
    assert disabled == inside and len(inside) == 6


def test_skip_patterns_disable_exactly_the_matched_quantizers(calibrated: torch.nn.Module) -> None:
    selective, skipped = keep_in_float(calibrated, SKIP)
    assert skipped == [
        "backbone.stem.conv.rbr_reparam",
        *(f"heads.head{i}.{p}" for i in (1, 2, 3) for p in ("cls_pred", "reg_pred")),
    ]
    enabled_before = {name for name, _ in tensor_quantizers(calibrated)}
    enabled_after = {name for name, _ in tensor_quantizers(selective)}
    disabled = enabled_before - enabled_after
    assert disabled == {f"{layer}.{kind}_quantizer" for layer in skipped for kind in ("input", "weight")}
    assert len(list(tensor_quantizers(calibrated))) == len(enabled_before), (
        "the calibrated model is untouched"
    )


def test_a_pattern_matching_nothing_is_an_error(calibrated: torch.nn.Module) -> None:
    with pytest.raises(NasquantError, match="'heads.*.cls_pred2' matches no quantizable layer"):
        match_layers(calibrated, ["heads.*.cls_pred2"])


def test_calibration_state_round_trips_to_identical_outputs(
    nas: NAS, calibrated: torch.nn.Module, tmp_path: Path
) -> None:
    path = save_calibration(calibrated, tmp_path / "calibration.safetensors", settings={"method": "max"})
    restored = load_calibration(nas.model, path)
    images = torch.from_numpy(_batches(nas, 2)[0])
    with torch.no_grad():
        expected, got = calibrated(images), restored(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_histogram_methods_clip_activations_below_the_max(nas: NAS, calibrated: torch.nn.Module) -> None:
    percentile = calibrate(nas.model, _batches(nas, 16), method="percentile", percentile=99.0, progress=False)
    max_ranges = {
        n: float(q.amax.max()) for n, q in tensor_quantizers(calibrated) if n.endswith("input_quantizer")
    }
    pct_ranges = {
        n: float(q.amax.max()) for n, q in tensor_quantizers(percentile) if n.endswith("input_quantizer")
    }
    assert all(pct_ranges[n] <= max_ranges[n] * 1.0001 for n in max_ranges)
    assert sum(pct_ranges[n] < 0.9 * max_ranges[n] for n in max_ranges) > len(max_ranges) // 2


def test_mse_keeps_the_image_input_range_and_the_model_accurate(
    nas: NAS, calibrated: torch.nn.Module
) -> None:
    batches = _batches(nas, 16)
    mse = calibrate(nas.model, batches, method="mse", progress=False)
    ranges = {n: float(q.amax.max()) for n, q in tensor_quantizers(mse) if n.endswith("input_quantizer")}
    max_ranges = {
        n: float(q.amax.max()) for n, q in tensor_quantizers(calibrated) if n.endswith("input_quantizer")
    }
    # The letterboxed 0-1 image fills its range: minimising the rounding + clipping error keeps most of it
    # (ModelOpt's own histogram mse picked 1/16 of it and the model detected nothing).
    stem = next(n for n in ranges if n.startswith("backbone.stem"))
    assert ranges[stem] > 0.5 * max_ranges[stem]
    assert all(ranges[n] <= max_ranges[n] * 1.0001 for n in ranges)
    images = torch.from_numpy(batches[0])
    with torch.no_grad():
        float_out, mse_out = nas.model(images), mse(images)
    assert float(mse_out[1].max()) > 0.5 * float(float_out[1].max())  # scores, already sigmoid


def test_selection_is_reproducible_and_refuses_validation_overlap(tmp_path: Path) -> None:
    folder = load_dataset(shared_path("data", "shapes", "calib"))
    first = select_calibration_images(folder, num_images=10, seed=3)
    assert first.image_paths == select_calibration_images(folder, num_images=10, seed=3).image_paths
    assert first.image_paths != select_calibration_images(folder, num_images=10, seed=4).image_paths
    listed = tmp_path / "list.txt"
    listed.write_text("# chosen by hand\n" + "\n".join(p.name for p in first.image_paths[:4]) + "\n")
    assert (
        select_calibration_images(folder, num_images=4, image_list=listed).image_paths
        == first.image_paths[:4]
    )
    with pytest.raises(NasquantError, match="offers 4"):
        select_calibration_images(folder, num_images=5, image_list=listed)

    val_images = sorted(shared_path("data", "shapes", "val", "images").glob("*.jpg"))
    check_no_overlap(first.image_paths, val_images)  # disjoint by construction
    copied = tmp_path / "renamed.jpg"
    copied.write_bytes(val_images[7].read_bytes())
    with pytest.raises(NasquantError, match="1 calibration images are validation images or copies"):
        check_no_overlap([*first.image_paths, copied], val_images)
    check_no_overlap([*first.image_paths, copied], val_images, allow=True)


def test_selective_int8_stays_within_half_a_point_of_the_recorded_fp32_map(nas: NAS) -> None:
    recorded = json.loads(shared_path("fixtures", "measured.json").read_text())["center_pad_320"][0]
    quantized = calibrate(nas.model, _batches(nas, 128), method="max", progress=False)
    selective, _ = keep_in_float(quantized, SKIP)
    val = load_dataset(shared_path("data", "shapes", "val", "annotations.json"))
    metrics = validate(TorchBackend(selective), val, nas.preprocessing(), progress=False)
    assert abs(metrics["map50_95"] - recorded) <= 0.005, metrics["map50_95"]
    assert np.isfinite(metrics["map50"])
