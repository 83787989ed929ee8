"""ONNX export: FP32 and INT8 (ModelOpt Q/DQ) graphs, the two INT8 flavours and end-to-end (NMS)
copies of any of them. The metadata keys and
I/O names they carry are the artifact contract, in :mod:`nasquant.artifacts`."""

from nasquant.export.conv_layouts import space_to_depth_input_convs, undo_space_to_depth_input_convs
from nasquant.export.graph import count_qdq
from nasquant.export.nms import append_nms, write_end_to_end
from nasquant.export.onnx import export_onnx
from nasquant.export.onnx_files import load_onnx, save_onnx, set_metadata
from nasquant.export.qdq import (
    drop_requantization,
    fold_scalar_multipliers,
    quantize_outputs,
    to_cpu_flavor,
    to_uint8_activations,
    unsigned_grids_for_nonnegative,
    write_cpu_flavor,
)

__all__ = [
    "append_nms",
    "count_qdq",
    "export_onnx",
    "load_onnx",
    "drop_requantization",
    "unsigned_grids_for_nonnegative",
    "fold_scalar_multipliers",
    "quantize_outputs",
    "save_onnx",
    "set_metadata",
    "space_to_depth_input_convs",
    "undo_space_to_depth_input_convs",
    "to_cpu_flavor",
    "to_uint8_activations",
    "write_cpu_flavor",
    "write_end_to_end",
]
