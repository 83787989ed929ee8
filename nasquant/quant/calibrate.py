"""INT8 post-training quantization of a fused YOLO-NAS with NVIDIA ModelOpt.

ModelOpt inserts a fake-quant ``TensorQuantizer`` on the input and the weight of every conv, and on both
operands of every residual Add (:mod:`nasquant.quant.modules`); we collect statistics on real
calibration batches and turn them into ``amax`` ranges. Weights are
per-output-channel max (what TensorRT's explicit quantization wants), activations per-tensor with
the recipe's calibrator: ``max``, or a histogram reduced by ``percentile`` / ``entropy`` / ``mse``.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from nasquant.errors import NasquantError

CALIBRATION_METHODS = ("max", "percentile", "entropy", "mse")


@contextmanager
def _quiet_modelopt() -> Iterator[None]:
    # ModelOpt warns about optional integrations (transformers, megatron...) that YOLO-NAS never uses.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"modelopt\..*")
        warnings.filterwarnings("ignore", message=r".*transformers.*")
        yield


def _mtq():
    with _quiet_modelopt():
        import modelopt.torch.quantization as mtq

        from nasquant.quant.modules import register_block_quantizers

        register_block_quantizers()
    return mtq


def quantization_config(method: str, *, per_channel_weights: bool = True) -> dict:
    """ModelOpt config: INT8 weights (per output channel), INT8 per-tensor conv inputs and residuals.

    ``algorithm`` is ``None``: ModelOpt only inserts the quantizers, and :func:`calibrate` drives the
    statistics itself, because ModelOpt's ``max`` algorithm cannot finish histogram calibrators.
    """
    if method not in CALIBRATION_METHODS:
        raise NasquantError(
            f"unknown calibration method {method!r}; expected one of {', '.join(CALIBRATION_METHODS)}"
        )
    activations: dict = {"num_bits": 8, "axis": None}
    if method != "max":
        activations["calibrator"] = "histogram"
    return {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {
                "quantizer_name": "*weight_quantizer",
                "cfg": {"num_bits": 8, "axis": 0 if per_channel_weights else None},
            },
            # A transposed conv stores weights as (in, out, kH, kW): its output channels are axis 1.
            {
                "quantizer_name": "*weight_quantizer",
                "parent_class": "nn.ConvTranspose2d",
                "cfg": {"num_bits": 8, "axis": 1 if per_channel_weights else None},
            },
            {"quantizer_name": "*input_quantizer", "cfg": activations},
            # the residual Add operands of every bottleneck (nasquant.quant.modules.QuantBottleneck)
            {"quantizer_name": "*residual_quantizer", "cfg": activations},
            {"quantizer_name": "*branch_quantizer", "cfg": activations},
        ],
        "algorithm": None,
    }


def insert_quantizers(model: nn.Module, method: str, *, per_channel_weights: bool = True) -> nn.Module:
    """A deep copy of ``model`` with (uncalibrated) INT8 quantizers on every conv and residual Add."""
    quantized = copy.deepcopy(model).eval()
    with _quiet_modelopt():
        _mtq().quantize(quantized, quantization_config(method, per_channel_weights=per_channel_weights))
    return quantized


def tensor_quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, quantizer)`` for every enabled ModelOpt ``TensorQuantizer`` in the model."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer) and module.is_enabled:
            yield name, module


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the modules that own quantizers, in model order.

    Every conv, the SPP max-pools, and the bottlenecks (their residual Add operands).
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    return [
        name
        for name, module in model.named_modules()
        if any(isinstance(child, TensorQuantizer) for child in module.children())
    ]


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[np.ndarray],
    *,
    method: str = "max",
    percentile: float = 99.99,
    per_channel_weights: bool = True,
    progress: bool = True,
    total: int | None = None,
) -> nn.Module:
    """Return a calibrated INT8 copy of the fused ``model`` (the original is left untouched)."""
    from modelopt.torch.quantization.model_calib import enable_stats_collection

    if not 0 < percentile <= 100:
        raise NasquantError(f"calibration percentile must be in (0, 100], got {percentile}")
    quantized = insert_quantizers(model, method, per_channel_weights=per_channel_weights)
    enable_stats_collection(quantized)
    seen = 0
    with tqdm(batches, total=total, desc=f"calibrate ({method})", unit="batch", disable=not progress) as bar:
        for batch in bar:
            quantized(torch.from_numpy(np.ascontiguousarray(batch)))
            seen += len(batch)
    if seen == 0:
        raise NasquantError("calibration received no images")
    for name, quantizer in tensor_quantizers(quantized):
        if method == "mse" and not name.endswith("weight_quantizer"):
            quantizer.amax = histogram_mse_amax(quantizer._calibrator)
        elif method != "max" and not name.endswith("weight_quantizer"):  # histogram-calibrated activations
            quantizer.load_calib_amax(
                method, **({"percentile": percentile} if method == "percentile" else {})
            )
        else:
            quantizer.load_calib_amax()
        if quantizer.amax is None or not torch.isfinite(quantizer.amax).all():
            raise NasquantError(f"calibration produced no valid range for {name}")
        quantizer.enable_quant()
        quantizer.disable_calib()
    return quantized


def histogram_mse_amax(calibrator, *, first_candidate_bin: int = 128, chunk: int = 256) -> torch.Tensor:
    """The amax minimising the INT8 rounding + clipping error over a ModelOpt histogram calibrator's bins.

    ModelOpt's own ``HistogramCalibrator.compute_amax("mse")`` (0.47) passes ``num_bits`` positionally
    into ``fake_tensor_quant``'s ``bias`` slot: every candidate's error then includes a shift of 8, the
    smallest candidate wins, and YOLO-NAS collapses to mAP 0 (``benchmarks/calibrators.md``). This is
    the same search (candidates from bin 128 on, bin centres weighted by counts) with the arguments in
    their places, evaluated ``chunk`` candidates at a time.
    """
    from modelopt.torch.quantization.tensor_quant import fake_tensor_quant

    if calibrator._calib_hist is None:
        raise NasquantError("mse calibration collected no histogram")
    counts = torch.as_tensor(calibrator._calib_hist, dtype=torch.float32).cpu()
    edges = torch.as_tensor(calibrator._calib_bin_edges, dtype=torch.float32).cpu()
    centers = (edges[1:] + edges[:-1]) / 2
    candidates = centers[min(first_candidate_bin, len(centers) - 1) :]
    errors = []
    for start in range(0, len(candidates), chunk):
        amax = candidates[start : start + chunk, None]
        grid = centers.expand(len(amax), -1).contiguous()
        # positional: (inputs, amax, bias, num_bits, unsigned); Function.apply takes no keywords
        quantized = fake_tensor_quant(grid, amax, None, calibrator._num_bits, bool(calibrator._unsigned))
        errors.append(((quantized - centers) ** 2 * counts).sum(dim=1))
    return candidates[torch.cat(errors).argmin()].clone()


def match_layers(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The quantized layers matched by any glob pattern; a pattern that matches nothing is an error."""
    layers = quantized_layers(model)
    matched: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(layers, pattern)
        if not hits:
            raise NasquantError(
                f"quantization.skip pattern {pattern!r} matches no quantizable layer "
                f"(layer names look like {layers[0]!r} or {layers[-1]!r})"
            )
        matched.update(hits)
    return [name for name in layers if name in matched]


def keep_in_float(model: nn.Module, patterns: Sequence[str]) -> tuple[nn.Module, list[str]]:
    """Copy of a calibrated model with every quantizer of the matched layers disabled (weights and inputs)."""
    selective = copy.deepcopy(model)
    skipped = match_layers(selective, patterns)
    modules = dict(selective.named_modules())
    for name in skipped:
        for _, quantizer in tensor_quantizers(modules[name]):
            quantizer.disable()
    return selective, skipped
