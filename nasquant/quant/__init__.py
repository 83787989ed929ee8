"""Selective INT8 post-training quantization with NVIDIA ModelOpt."""

from nasquant.quant.bias_correction import BiasCorrection, correct_biases
from nasquant.quant.calibrate import (
    CALIBRATION_METHODS,
    calibrate,
    insert_quantizers,
    keep_in_float,
    match_layers,
    quantization_config,
    quantized_layers,
)
from nasquant.quant.state import load_calibration, read_calibration_settings, save_calibration

__all__ = [
    "CALIBRATION_METHODS",
    "BiasCorrection",
    "calibrate",
    "correct_biases",
    "insert_quantizers",
    "keep_in_float",
    "load_calibration",
    "match_layers",
    "quantization_config",
    "quantized_layers",
    "read_calibration_settings",
    "save_calibration",
]
