"""A layout that gives ONNX Runtime's CPU provider a fast integer kernel where the graph's own is slow,
part of the CPU INT8 flavour (:mod:`nasquant.export.qdq` applies it in order): a strided conv on a
few-channel input (the RGB stem) reads it through SpaceToDepth as a stride-1 conv with rearranged int8
weights, the same sums on a kernel that is fast for many channels.

Only what measurably pays stays here (``benchmarks/ort_quantizer.md``): the stem's kernels take 1.0–1.2
instead of ≈ 1.9 ms per call at 640 on a 2-core EPYC (1.2 instead of 5.0 on a Xeon). Rewriting the
neck's upsampling ConvTransposes as an integer 1x1 conv + DepthToSpace saved nothing (0.97 vs 0.99
ms: ORT's uint8 DepthToSpace costs what the float ConvTranspose does) and was removed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from nasquant.export.graph import (
    constant_values,
    consumer_index,
    forget_value_info,
    producer_index,
    quantizer_zero_point,
    remove_dead_nodes,
    rewritten,
    splice,
    unique_name,
)


def space_to_depth_input_convs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where a quantized strided conv on a few-channel input reads it space-to-depth.

    ONNX Runtime's integer convolution is slow on a 3-channel image (YOLO-NAS's stem: 3x3, stride 2,
    three times the time of the float kernel). A conv with stride ``s`` equals a stride-1 conv over
    the SpaceToDepth(s) of its input, with ``s*s`` times the input channels and a kernel of
    ``ceil``-ish ``k/s`` blocks whose missing taps are zero: output ``i`` reads input row
    ``s*i - pad + ky``, which is row ``(ky - pad) mod s`` of block ``i + floor((ky - pad) / s)``. The
    SpaceToDepth moves the quantized values (between the input's Q and DQ), the conv pads blocks with
    the zero point as before: bit-identical results, on a fast integer kernel.
    """
    return rewritten(model, apply_space_to_depth_input_convs)


#: input channel count at or below which a strided integer conv reads its input space-to-depth
_FEW_CHANNELS = 4


def apply_space_to_depth_input_convs(model: onnx.ModelProto) -> None:
    graph = model.graph
    values = constant_values(graph)
    producers = producer_index(graph)
    consumers = consumer_index(graph)
    taken = set(values) | set(producers) | {node.name for node in graph.node}
    shapes = {
        info.name: [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
        for info in (*onnx.shape_inference.infer_shapes(model).graph.value_info, *graph.input)
    }
    inserted: dict[str, list[onnx.NodeProto]] = {}  # a SpaceToDepth goes right before the input's DQ
    reshaped: set[str] = set()  # tensors whose recorded shapes are stale now
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        data_dq, weight_dq = (producers.get(name) for name in node.input[:2])
        if data_dq is None or data_dq.op_type != "DequantizeLinear":
            continue
        holder = _weight_holder(weight_dq, producers, values)
        per_tensor = values.get(data_dq.input[1]) is not None and values[data_dq.input[1]].size == 1
        if holder is None or not per_tensor or len(consumers[data_dq.output[0]]) != 1:
            continue
        weight = values[holder.input[0]]
        blocks = _blocks_conv(node, weight, shapes.get(data_dq.input[0], []))
        if blocks is None or weight.shape[1] > _FEW_CHANNELS:
            continue
        stride, pads, blocks_weight = blocks
        moved = unique_name(taken, f"{data_dq.input[0]}_space_to_depth")
        space_to_depth = onnx.helper.make_node(
            "SpaceToDepth",
            [data_dq.input[0]],
            [moved],
            name=unique_name(taken, f"{node.name or node.output[0]}/SpaceToDepth"),
            blocksize=stride,
        )
        inserted[data_dq.output[0]] = [space_to_depth, data_dq]
        data_dq.input[0] = moved
        reshaped.update((data_dq.output[0], holder.output[0], weight_dq.output[0]))
        weight_name = unique_name(taken, f"{holder.input[0]}_space_to_depth")
        graph.initializer.append(numpy_helper.from_array(blocks_weight, weight_name))
        holder.input[0] = weight_name
        attributes = {"kernel_shape": list(blocks_weight.shape[2:]), "strides": [1, 1], "pads": pads}
        kept = [a for a in node.attribute if a.name not in attributes]
        del node.attribute[:]
        node.attribute.extend([*kept, *(onnx.helper.make_attribute(k, v) for k, v in attributes.items())])
    splice(graph, inserted)
    forget_value_info(graph, reshaped)
    remove_dead_nodes(graph)  # the conv's original weight (float or int8), which nothing reads now


def _weight_holder(
    dequantize: onnx.NodeProto | None, producers: dict[str, onnx.NodeProto], values: dict[str, np.ndarray]
) -> onnx.NodeProto | None:
    """The node that reads the constant weight ``dequantize`` dequantizes, if it is one: the DQ itself
    for int8 weights, or ModelOpt's QuantizeLinear of float weights. Either way a zero weight (the
    rearrangement's padding) is the quantized zero: int8 weights have zero point 0 here, and a float 0
    quantizes to the zero point."""
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return None
    if dequantize.input[0] in values:
        zero = quantizer_zero_point(dequantize, values)
        return dequantize if zero is None or not zero.any() else None
    quantize = producers.get(dequantize.input[0])
    if quantize is None or quantize.op_type != "QuantizeLinear" or quantize.input[0] not in values:
        return None
    return quantize


def _blocks_conv(
    node: onnx.NodeProto, weight: np.ndarray, input_shape: list[int | None]
) -> tuple[int, list[int], np.ndarray] | None:
    """The stride-1 conv over SpaceToDepth(s) blocks equal to ``node``: ``(s, pads, weight)``, or None
    unless ``node`` is a plain 2-D conv (one group, no dilation or auto_pad) with one stride ``s > 1``
    over a static input whose sides ``s`` divides."""
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    strides = list(attributes.get("strides", [1, 1]))
    kernel = list(attributes.get("kernel_shape", weight.shape[2:]))
    pads = list(attributes.get("pads", [0, 0, 0, 0]))
    plain = (
        attributes.get("group", 1) == 1
        and list(attributes.get("dilations", [1, 1])) == [1, 1]
        and attributes.get("auto_pad", b"NOTSET") == b"NOTSET"
        and len(kernel) == 2
        and len(input_shape) == 4
        and strides[0] == strides[1] >= 2
    )
    if not plain:
        return None
    stride, sides = strides[0], input_shape[2:]
    if any(side is None or side % stride for side in sides):
        return None
    # Per axis: tap ``t`` of output ``i`` reads block ``i + (t - pad) // s``, row ``(t - pad) % s``.
    block_pads, first_blocks, block_kernel = [0, 0, 0, 0], [], []
    for axis in range(2):
        size, begin, end, taps = sides[axis], pads[axis], pads[axis + 2], kernel[axis]
        outputs = (size + begin + end - taps) // stride + 1
        first, last = -begin // stride, (taps - 1 - begin) // stride
        blocks = size // stride
        block_pads[axis], block_pads[axis + 2] = -first, max(0, outputs - 1 + last - (blocks - 1))
        if blocks + block_pads[axis] + block_pads[axis + 2] - (last - first + 1) + 1 != outputs:
            return None
        first_blocks.append(first)
        block_kernel.append(last - first + 1)
    cout, cin = weight.shape[:2]
    blocks_weight = np.zeros((cout, cin * stride * stride, *block_kernel), weight.dtype)
    for ty in range(kernel[0]):
        for tx in range(kernel[1]):
            (by, dy), (bx, dx) = (divmod(tap - pads[axis], stride) for axis, tap in ((0, ty), (1, tx)))
            channel = (dy * stride + dx) * cin  # SpaceToDepth's channel order: (row, column, channel)
            blocks_weight[:, channel : channel + cin, by - first_blocks[0], bx - first_blocks[1]] = weight[
                :, :, ty, tx
            ]
    return stride, block_pads, blocks_weight
