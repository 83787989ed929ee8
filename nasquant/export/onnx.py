"""ONNX export of a (fused, optionally ModelOpt-quantized) YOLO-NAS module.

The graph takes ``images`` (N, 3, H, W) float32 in [0, 1] and returns ``boxes`` (N, A, 4) xyxy input
pixels and ``scores`` (N, A, C), the same contract as :class:`nasquant.runtime.Backend`. nasquant's
facts about the artifact (class names, input size, precision, ...) travel in the file's
``metadata_props`` under the ``nasquant.*`` keys of :mod:`nasquant.artifacts`, so any runtime can read
them back.

A quantized graph stores its weights as int8 initializers read by DequantizeLinear (ModelOpt's
``qdq_to_dq``), the explicit-quantization pattern TensorRT and ONNX Runtime both take: a quarter of
the bytes of float weights quantized at load time, and the same int8 values, so the same outputs.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from nasquant._version import __version__
from nasquant.artifacts import (
    BATCH_AXIS,
    INPUT_NAME,
    KEY_INPUT_SIZE,
    KEY_PRECISION,
    KEY_VERSION,
    MAX_OPSET,
    MIN_OPSET,
    OUTPUT_NAMES,
)
from nasquant.data.preprocess import check_input_size
from nasquant.errors import NasquantError
from nasquant.export.graph import count_qdq, unique_name
from nasquant.export.nms import append_nms
from nasquant.export.onnx_files import check_metadata, write_checked
from nasquant.io import atomic_path
from nasquant.models.layers import HALF_FACTORS_ATTRIBUTE, HalfFactors
from nasquant.settings import DEFAULT_FLOAT_WEIGHTS, FloatWeights, NMSSettings


def export_onnx(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    imgsz: int,
    batch: int = 1,
    dynamic_batch: bool = False,
    opset: int = 17,
    metadata: Mapping[str, str] | None = None,
    simplify: bool = False,
    int8_weights: bool = True,
    float_weights: FloatWeights = DEFAULT_FLOAT_WEIGHTS,
    nms: NMSSettings | None = None,
) -> Path:
    """Write ``model`` as a checked ONNX graph at ``path``; return the path.

    The file appears under its final name only once ``onnx.checker`` accepted it. ``metadata``
    values must be strings; the input size, nasquant version and precision (``int8`` when the graph
    holds QuantizeLinear nodes, else ``fp32``, unless given) are recorded by the export itself.
    ``simplify`` constant-folds and cleans the graph with onnxslim, keeping every Q/DQ node.
    ``int8_weights`` stores a quantized graph's weights as int8 (bit-identical outputs, tested); off,
    they stay float initializers behind a QuantizeLinear, as ModelOpt's exporter writes them.
    ``float_weights`` is how a quantized graph stores the conv weights of its floating-point layers
    (:data:`~nasquant.settings.FloatWeights`); an FP32 graph always keeps float32.
    ``nms`` makes it an end-to-end graph (:func:`~nasquant.export.nms.append_nms`).
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise NasquantError(
            f"ONNX opset must be from {MIN_OPSET} (per-channel Q/DQ) to {MAX_OPSET} (the highest torch's "
            f"TorchScript exporter writes), got {opset}"
        )
    check_input_size(imgsz, "export input size")
    if batch < 1:
        raise NasquantError(f"export batch size must be at least 1, got {batch}")
    check_metadata(metadata or {})  # fail before tracing, not after
    path = Path(path)
    half_factors = half_factors_by_weight(model)
    with atomic_path(path) as tmp:
        _trace_to_file(model, tmp, imgsz=imgsz, batch=batch, dynamic_batch=dynamic_batch, opset=opset)
        graph = onnx.load(str(tmp))
        if simplify:
            graph = _simplify(graph)
        quantized = _has_op(graph, "QuantizeLinear")
        if int8_weights and quantized:
            graph = store_int8_weights(graph)
        if quantized:
            own_weight_quantizer_parameters(graph)
        if float_weights == "float16" and quantized:
            store_half_float_weights(graph, half_factors)
        if nms is not None:
            graph = append_nms(graph, nms)
        facts = {
            KEY_VERSION: __version__,
            KEY_PRECISION: "int8" if quantized else "fp32",
            **(metadata or {}),
            # A fact about this very graph: it wins over a caller's value (e.g. copies exported for
            # benchmarking at another size than validation).
            KEY_INPUT_SIZE: str(imgsz),
        }
        write_checked(graph, tmp, facts)
    return path


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    with warnings.catch_warnings():
        # Python control flow on tensor values (ModelOpt's amax checks) is constant for a fixed
        # calibrated model, which is exactly what the trace should bake in.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # We choose the TorchScript exporter on purpose: ModelOpt's Q/DQ symbolics only exist there.
        warnings.filterwarnings(
            "ignore", message=r".*legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", message=r"The feature will be removed", category=DeprecationWarning)
        yield


def _trace_to_file(
    model: torch.nn.Module, target: Path, *, imgsz: int, batch: int, dynamic_batch: bool, opset: int
) -> None:
    was_training = model.training
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dummy = torch.zeros(batch, 3, imgsz, imgsz, device=device)
    dynamic_axes = {name: {0: BATCH_AXIS} for name in (INPUT_NAME, *OUTPUT_NAMES)} if dynamic_batch else None
    model.eval()
    try:
        with torch.no_grad(), _quiet_exporter():
            torch.onnx.export(
                model,
                (dummy,),
                str(target),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                opset_version=opset,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        model.train(was_training)


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        import onnxslim
    except ImportError as exc:
        raise NasquantError("graph simplification needs onnxslim: pip install onnxslim") from exc
    before = count_qdq(model)
    # Common-subexpression elimination merges the separate quantizers ModelOpt puts on each consumer
    # of a shared tensor; equal numerics, but the Q/DQ placement TensorRT sees must stay ModelOpt's.
    simplified = onnxslim.slim(model, skip_optimizations=["subexpression_elimination"])
    after = count_qdq(simplified)
    if after != before:
        raise NasquantError(
            f"graph simplification changed the Q/DQ nodes ({before} -> {after}); export with simplify off"
        )
    return simplified


def store_int8_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose quantized weights are int8 initializers feeding DequantizeLinear.

    ModelOpt's ``qdq_to_dq`` computes them as QuantizeLinear does (float32 division by the per-channel
    scale, rounding half to even, saturation) and drops the weight QuantizeLinear nodes; activation
    quantizers are untouched.
    """
    from modelopt.onnx.quantization.qdq_utils import qdq_to_dq

    converter_log = logging.getLogger("modelopt.onnx")
    level = converter_log.level
    converter_log.setLevel(logging.WARNING)  # it logs every conversion at INFO
    try:
        return qdq_to_dq(copy.deepcopy(model))
    finally:
        converter_log.setLevel(level)


def own_weight_quantizer_parameters(model: onnx.ModelProto) -> None:
    """Give every weight DequantizeLinear its own scale and zero-point initializers, in place.

    onnxslim's weight tying merges equal initializers, among them the all-zero weight zero points of
    every conv with the same channel count, the neck's ConvTransposes (axis 1) with the convs (axis 0).
    Same values, same outputs on ONNX Runtime (tested), but OpenVINO then cannot fold that zero point
    into the convs' weights and runs 37 of them in f32 (benchmarks/openvino.md). Activation quantizers
    stay as they are: ONNX Runtime's Q/DQ fusions read which of them share a constant.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    taken = set(initializers) | {name for node in graph.node for name in node.output}
    claimed: set[str] = set()
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            continue  # an activation's
        for index in range(1, len(node.input)):
            name = node.input[index]
            if name not in initializers:
                continue
            if name in claimed:
                copy_of = onnx.TensorProto()
                copy_of.CopyFrom(initializers[name])
                copy_of.name = unique_name(taken, f"{name}/{node.name or node.output[0]}")
                graph.initializer.append(copy_of)
                node.input[index] = copy_of.name
            claimed.add(node.input[index])


def half_factors_by_weight(model: torch.nn.Module) -> dict[str, HalfFactors]:
    """Each folded conv's :class:`~nasquant.models.layers.HalfFactors`, keyed by its weight's
    state-dict name (the name the traced graph gives the weight initializer)."""
    return {
        f"{name}.weight": getattr(module, HALF_FACTORS_ATTRIBUTE)
        for name, module in model.named_modules()
        if hasattr(module, HALF_FACTORS_ATTRIBUTE)
    }


def store_half_float_weights(
    model: onnx.ModelProto, factors: Mapping[str, HalfFactors] | None = None
) -> None:
    """Store every float32 conv weight initializer of ``model`` in float16, read through a Cast to
    float32, in place.

    The convs are the layers an INT8 graph keeps in floating point (the quantized ones read int8
    weights through DequantizeLinear). Runtimes fold the Cast into a float32 constant when they load
    the graph. A weight exactly representable in float16 loses nothing; so does a folded one whose
    ``factors`` (weight before BatchNorm folding, in float16, and the per-channel BatchNorm scale)
    rebuild its exact float32 values: it is stored as ``Cast(half) * scale``, the product the fold
    computed. Any other weight is rounded to half precision: TensorRT runs these layers in FP16
    anyway, ONNX Runtime and OpenVINO in float32 on the rounded values.
    """
    graph = model.graph
    factors = factors or {}
    conv_weights = {node.input[1] for node in graph.node if node.op_type in ("Conv", "ConvTranspose")}
    rebuilds = []
    for index, initializer in enumerate(graph.initializer):
        if initializer.name not in conv_weights or initializer.data_type != TensorProto.FLOAT:
            continue
        name, weight = initializer.name, numpy_helper.to_array(initializer)
        half, scale = weight.astype(np.float16), None
        if not _same_bits(half.astype(np.float32), weight) and name in factors:
            candidate = factors[name]
            half = candidate.half_weight.cpu().numpy()
            scale = candidate.channel_scale.cpu().numpy().astype(np.float32)
            if half.shape != weight.shape or not _same_bits(half.astype(np.float32) * scale, weight):
                # the graph's weight is not the fold these factors describe
                half, scale = weight.astype(np.float16), None
        stored = f"{name}_float16"
        graph.initializer[index].CopyFrom(numpy_helper.from_array(half, stored))
        if scale is None:
            rebuilds.append(_cast_to_float(stored, name))
        else:
            graph.initializer.append(numpy_helper.from_array(scale, f"{name}_scale"))
            rebuilds += [
                _cast_to_float(stored, f"{stored}_float32"),
                onnx.helper.make_node(
                    "Mul", [f"{stored}_float32", f"{name}_scale"], [name], name=f"{name}/rebuild"
                ),
            ]
    # The rebuilds read only initializers: first in the node list keeps it topologically sorted.
    nodes = [*rebuilds, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)


def _cast_to_float(source: str, target: str) -> onnx.NodeProto:
    return onnx.helper.make_node("Cast", [source], [target], to=TensorProto.FLOAT, name=f"{source}/Cast")


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.dtype == b.dtype == np.float32
        and a.shape == b.shape
        and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    )


def _has_op(model: onnx.ModelProto, op_type: str) -> bool:
    return any(node.op_type == op_type for node in model.graph.node)
