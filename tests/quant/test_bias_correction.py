"""Bias correction on the calibrated shapes fixture: what it measures, what it changes, what it leaves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from modelopt.torch.quantization.nn import TensorQuantizer

from nasquant import NAS
from nasquant.data.calibration import select_calibration_images
from nasquant.data.datasets import iter_batches, load_dataset
from nasquant.errors import NasquantError
from nasquant.quant import correct_biases, keep_in_float
from nasquant.settings import BOX_BRANCH_LAYERS
from tests.shared import shared_path

STEM = "backbone.stem.conv.rbr_reparam"


@pytest.fixture(scope="module")
def batches(shapes_nas: NAS) -> list[np.ndarray]:
    chosen = select_calibration_images(load_dataset(shared_path("data", "shapes", "calib")), num_images=16)
    return [batch.images for batch in iter_batches(chosen, shapes_nas.preprocessing(), 8)]


def _biases(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith(".bias")}


def test_each_quantized_conv_gets_its_mean_output_shift_added_to_its_bias(
    shapes_nas: NAS, calibrated: torch.nn.Module, batches: list[np.ndarray]
) -> None:
    before = _biases(calibrated)
    first = correct_biases(calibrated, batches, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in _biases(calibrated).items())  # the input is untouched
    assert len(first.shifts) == 98  # YOLO-NAS-S's convs (the two ConvTransposes are not corrected)
    assert first.mean_abs_shift > 0
    after = _biases(first.model)
    for name, shift in first.shifts.items():
        assert torch.equal(after[f"{name}.bias"], before[f"{name}.bias"] + torch.from_numpy(shift))
    # The stem reads the image, which no correction changes: corrected, its per-channel output means are
    # the float model's, to float rounding; uncorrected, they were off by the measured shift.
    fp32, uncorrected, corrected = (
        _channel_means(model, STEM, batches) for model in (shapes_nas.model, calibrated, first.model)
    )
    np.testing.assert_allclose(fp32 - uncorrected, first.shifts[STEM], rtol=1e-3, atol=1e-6)
    assert np.abs(corrected - fp32).max() < 1e-3 * np.abs(first.shifts[STEM]).max()


def _channel_means(model: torch.nn.Module, layer: str, batches: list[np.ndarray]) -> np.ndarray:
    """The per-channel mean of ``layer``'s output over ``batches``."""
    sums: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda _module, _inputs, output: sums.append(output.double().mean(dim=(0, 2, 3)) * len(output))
    )
    try:
        with torch.no_grad():
            for batch in batches:
                model(torch.from_numpy(batch))
    finally:
        handle.remove()
    return (torch.stack(sums).sum(0) / sum(len(b) for b in batches)).numpy()


def test_layers_kept_in_float_are_not_corrected(
    calibrated: torch.nn.Module, batches: list[np.ndarray]
) -> None:
    selective, skipped = keep_in_float(calibrated, list(BOX_BRANCH_LAYERS))
    corrected = correct_biases(selective, batches, progress=False)
    assert len(skipped) == 6 and not set(skipped) & set(corrected.shifts)
    assert len(corrected.shifts) == 98 - len(skipped)


def test_a_model_without_quantizers_is_refused(shapes_nas: NAS, batches: list[np.ndarray]) -> None:
    with pytest.raises(NasquantError, match="no conv has an enabled quantizer"):
        correct_biases(shapes_nas.model, batches, progress=False)


def test_the_cpu_flavour_is_measured_on_the_unsigned_grids_of_the_nonnegative_inputs(
    calibrated: torch.nn.Module, batches: list[np.ndarray]
) -> None:
    signed = correct_biases(calibrated, batches, progress=False)
    # the image (0-1) and every Relu output are never negative; the box branch's decode inputs are
    assert f"{STEM}.input_quantizer" in signed.nonnegative_quantizers
    activation_quantizers = {
        name
        for name, module in calibrated.named_modules()
        if isinstance(module, TensorQuantizer) and module.is_enabled and not name.endswith("weight_quantizer")
    }
    assert signed.nonnegative_quantizers < activation_quantizers
    unsigned = correct_biases(
        calibrated, batches, unsigned_quantizers=signed.nonnegative_quantizers, progress=False
    )
    # the stem's input rounded on a grid twice as fine: a different shift; the same convs corrected
    assert not np.array_equal(unsigned.shifts[STEM], signed.shifts[STEM])
    assert unsigned.shifts.keys() == signed.shifts.keys()
    with pytest.raises(NasquantError, match="no enabled activation quantizer named 'nope'"):
        correct_biases(calibrated, batches, unsigned_quantizers=["nope"], progress=False)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation", "groups", "mode"),
    [
        (3, 2, 1, 1, 1, "zeros"),
        (1, 1, 0, 1, 1, "zeros"),
        (3, 1, 1, 1, 8, "zeros"),
        (3, 2, 2, 2, 4, "zeros"),
        (5, 3, 2, 1, 1, "zeros"),
        pytest.param(  # uneven: one more row of padding below than above (torch warns it copies)
            (4, 2), 1, "same", 1, 1, "zeros", marks=pytest.mark.filterwarnings("ignore:Using padding='same'")
        ),
        (3, 1, 1, 1, 1, "reflect"),
        (3, 2, (2, 1), 1, 2, "circular"),
    ],
)
def test_the_float_side_is_the_convs_own_per_channel_sum(
    kernel: int | tuple[int, int],
    stride: int,
    padding: int | str | tuple[int, int],
    dilation: int,
    groups: int,
    mode: str,
) -> None:
    # The float conv is never run: its per-channel sum comes from tap sums of its input. Odd sizes put
    # the last window against the padded border.
    from nasquant.quant.bias_correction import _float_conv_channel_sums

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, kernel, stride, padding, dilation, groups, bias=False, padding_mode=mode)
    inputs = torch.randn(3, 8, 23, 18)
    with torch.no_grad():
        outputs = conv(inputs)
        expected = outputs.double().sum(dim=(0, 2, 3))
        got = _float_conv_channel_sums(conv, inputs, outputs.shape[2:])
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-3)
