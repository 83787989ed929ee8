"""Bias correction: cancel each quantized conv's mean output shift, measured on calibration images.

Rounding a conv's weights (and its input) to the INT8 grid moves the mean of each output channel a
little, and a detector's box and score heads integrate such shifts over many layers. NNCF applies the
remedy by default (its FastBiasCorrection); ModelOpt does not. Here, in one pass of the calibrated,
fake-quantized model over the calibration images, every quantized conv sees the input the quantized
network gives it, and its quantized output (the pass's) is compared with what its float weights give on
the unrounded input. The per-channel mean of the difference is added to the conv's bias. Only that mean
is needed, and a conv is linear: the float side's mean is each weight times the mean of the inputs its
kernel tap reads, so the float conv is never run (the pass takes a quarter less time). The bias stays
a float tensor of the network, so every exported flavour (TensorRT's, the CPU's, OpenVINO's IR) carries
the correction and the graphs remain pure Q/DQ.

Each conv's shift is measured on the inputs of the uncorrected network (one pass, like NNCF's fast
variant): the corrections of earlier layers change later inputs by a second-order amount.

The shift depends on the grid. The TensorRT flavour computes ModelOpt's signed activation grids, the
CPU flavour puts every non-negative tensor on an unsigned grid twice as fine
(:func:`nasquant.export.qdq.unsigned_grids_for_nonnegative`), whose rounding moves means less; a
correction measured on one grid over-corrects the other (measured: ``benchmarks/calibrators.md``).
So a correction is measured per flavour: first on ModelOpt's grids (the TensorRT flavour), a pass that
also records which activation quantizers never saw a negative input; then, with those quantizers
running unsigned (scale amax/255) while measuring, on the CPU flavour's grids::

    trt = correct_biases(model, batches)
    cpu = correct_biases(model, batches, unsigned_quantizers=trt.nonnegative_quantizers)
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nasquant.errors import NasquantError


@dataclass
class _ShiftSum:
    total: torch.Tensor
    count: int = 0


@dataclass(frozen=True)
class BiasCorrection:
    """A bias-corrected copy of a calibrated model and what was added to each conv's bias."""

    model: nn.Module
    shifts: dict[str, np.ndarray] = field(repr=False)
    """Per quantized conv (module name): the per-output-channel amount added to its bias."""
    nonnegative_quantizers: frozenset[str] = field(repr=False)
    """The enabled activation quantizers (module names) whose input was never negative in the pass."""

    @property
    def mean_abs_shift(self) -> float:
        """The mean |shift| over every corrected channel: how much the rounding had moved outputs."""
        values = np.concatenate([shift.ravel() for shift in self.shifts.values()]) if self.shifts else []
        return float(np.abs(values).mean()) if len(values) else 0.0


def _quantized_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """The convs whose weight or input is quantized (ModelOpt's quantizers enabled)."""
    convs = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        quantizers = [getattr(module, attr, None) for attr in ("weight_quantizer", "input_quantizer")]
        if any(q is not None and q.is_enabled for q in quantizers):
            convs[name] = module
    return convs


@torch.no_grad()
def correct_biases(
    model: nn.Module,
    batches: Iterable[np.ndarray],
    *,
    unsigned_quantizers: Collection[str] = (),
    progress: bool = True,
    total: int | None = None,
) -> BiasCorrection:
    """A copy of the calibrated ``model`` whose quantized convs' biases cancel their mean output shift
    on ``batches`` (the calibration images, preprocessed), measured on ModelOpt's grids except for the
    ``unsigned_quantizers`` (activation quantizer names), which run on the unsigned grid of their range
    (the CPU flavour's grids: pass a TensorRT-flavour correction's ``nonnegative_quantizers``).
    ``model`` is untouched."""
    corrected = copy.deepcopy(model).eval()
    convs = _quantized_convs(corrected)
    if not convs:
        raise NasquantError("bias correction needs a quantized model: no conv has an enabled quantizer")
    batches = [np.ascontiguousarray(batch) for batch in batches]
    if not batches:
        raise NasquantError("bias correction received no images")
    activation_quantizers = _activation_quantizers(corrected)
    unknown = set(unsigned_quantizers) - set(activation_quantizers)
    if unknown:
        raise NasquantError(f"bias correction: no enabled activation quantizer named {sorted(unknown)[0]!r}")
    unsigned = [activation_quantizers[name] for name in unsigned_quantizers]
    for quantizer in unsigned:
        quantizer.unsigned = True
    minima: dict[str, float] = {}

    def record_minimum(name: str):
        def hook(_quantizer: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            minima[name] = min(minima.get(name, float("inf")), float(inputs[0].min()))

        return hook

    sums: dict[str, _ShiftSum] = {}

    def measure(name: str):
        def hook(module: nn.Conv2d, inputs: tuple[torch.Tensor, ...], quantized: torch.Tensor) -> None:
            # per channel, summed over the batch and positions: float conv on the unrounded input minus
            # the quantized conv (both with the bias). The float side comes from tap sums of the input
            # (exact by linearity) instead of running the conv again: a quarter of the pass on YOLO-NAS-S.
            positions = quantized.numel() // quantized.shape[1]
            difference = _float_conv_channel_sums(module, inputs[0], quantized.shape[2:])
            if module.bias is not None:
                difference += module.bias.double() * positions
            difference -= _channel_sums(quantized)
            entry = sums.setdefault(name, _ShiftSum(torch.zeros_like(difference)))
            entry.total += difference
            entry.count += positions

        return hook

    handles = [module.register_forward_hook(measure(name)) for name, module in convs.items()]
    handles += [q.register_forward_hook(record_minimum(name)) for name, q in activation_quantizers.items()]
    try:
        with tqdm(batches, total=total, desc="bias correction", unit="batch", disable=not progress) as bar:
            for batch in bar:
                corrected(torch.from_numpy(batch))
    finally:
        for handle in handles:
            handle.remove()
        for quantizer in unsigned:  # the model keeps ModelOpt's grids: the CPU flavour derives its own
            quantizer.unsigned = False
    shifts = {}
    for name, module in convs.items():
        entry = sums.get(name)
        if entry is None:  # a conv the forward pass never reached
            continue
        shift = (entry.total / entry.count).to(module.weight.dtype)
        if module.bias is None:
            module.bias = nn.Parameter(shift.clone())
        else:
            module.bias.add_(shift)
        shifts[name] = shift.cpu().numpy()
    nonnegative = frozenset(name for name, minimum in minima.items() if minimum >= 0)  # reached, never < 0
    return BiasCorrection(corrected, shifts, nonnegative)


def _channel_sums(outputs: torch.Tensor) -> torch.Tensor:
    """Per channel, the sum over the batch and positions, float64: each image's plane summed in float32
    (as exact as the float32 conv that made it), the rest in float64, with no float64 copy of it all."""
    return outputs.sum(dim=(2, 3)).double().sum(dim=0)


def _float_conv_channel_sums(conv: nn.Conv2d, inputs: torch.Tensor, output_size: torch.Size) -> torch.Tensor:
    """Per output channel, the sum over the batch and every output position of ``conv`` in float on
    ``inputs``, bias left out, in float64. By linearity it is each weight times the sum of the inputs its
    kernel tap reads, so it needs one pass of slice sums over the batch-summed input instead of a conv."""
    (stride_h, stride_w), (dilation_h, dilation_w) = conv.stride, conv.dilation
    kernel_h, kernel_w = conv.kernel_size
    out_h, out_w = output_size
    image_sum = inputs.sum(dim=0).double()  # float32 over the batch (a handful of terms), then float64
    # padding is linear in the input whatever its mode, so the batch-summed image is padded as the conv
    # pads each image; torch keeps the amounts, "same" resolved, as (left, right, top, bottom)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(image_sum, conv._reversed_padding_repeated_twice, mode=mode)
    tap_sums = image_sum.new_empty((image_sum.shape[0], kernel_h, kernel_w))
    for row in range(kernel_h):
        for col in range(kernel_w):
            top, left = row * dilation_h, col * dilation_w
            window = padded[
                :,
                top : top + (out_h - 1) * stride_h + 1 : stride_h,
                left : left + (out_w - 1) * stride_w + 1 : stride_w,
            ]
            tap_sums[:, row, col] = window.sum(dim=(1, 2))
    groups, weight = conv.groups, conv.weight.double()
    per_group = torch.einsum(
        "goiyx,giyx->go",
        weight.reshape(groups, -1, *weight.shape[1:]),
        tap_sums.reshape(groups, -1, kernel_h, kernel_w),
    )
    return per_group.reshape(-1)


def _activation_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """The enabled activation quantizers (not weights), by module name."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, TensorQuantizer) and module.is_enabled and not name.endswith("weight_quantizer")
    }
