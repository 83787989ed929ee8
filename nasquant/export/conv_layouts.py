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

from collections.abc import Iterator

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
    shapes = _static_shapes(model)
    inserted: dict[str, list[onnx.NodeProto]] = {}  # a SpaceToDepth goes right before the input's DQ
    reshaped: set[str] = set()  # tensors whose recorded shapes are stale now
    for node, data_dq, weight_dq in _convs_of_dequantized_inputs(graph, producers):
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
        _set_attributes(node, kernel_shape=list(blocks_weight.shape[2:]), strides=[1, 1], pads=pads)
    splice(graph, inserted)
    forget_value_info(graph, reshaped)
    remove_dead_nodes(graph)  # the conv's original weight (float or int8), which nothing reads now


def _convs_of_dequantized_inputs(
    graph: onnx.GraphProto, producers: dict[str, onnx.NodeProto]
) -> Iterator[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto | None]]:
    """Each conv whose data input comes from a DequantizeLinear: ``(conv, data DQ, weight producer)``."""
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        data_dq, weight_dq = (producers.get(name) for name in node.input[:2])
        if data_dq is not None and data_dq.op_type == "DequantizeLinear":
            yield node, data_dq, weight_dq


def _set_attributes(node: onnx.NodeProto, **attributes: object) -> None:
    kept = [a for a in node.attribute if a.name not in attributes]
    del node.attribute[:]
    node.attribute.extend([*kept, *(onnx.helper.make_attribute(k, v) for k, v in attributes.items())])


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Each tensor's inferred shape, None for a dimension that is not a number."""
    return {
        info.name: [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
        for info in (*onnx.shape_inference.infer_shapes(model).graph.value_info, *model.graph.input)
    }


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


def undo_space_to_depth_input_convs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where each conv that reads its input space-to-depth (as
    :func:`space_to_depth_input_convs` writes it) is the equivalent strided conv again.

    Where ONNX Runtime's fast path is a SpaceToDepth, OpenVINO's is the strided conv itself: its
    SpaceToDepth is one more pass over the image (``benchmarks/openvino.md``). The inverse needs no
    record of the original kernel: a block tap ``(b, d)`` of a stride-``s`` conv is tap ``b * s + d`` of
    the strided kernel, with pads times ``s``; rows and columns of taps that are zero in every filter
    (the rearrangement's padding) are then trimmed with their pad. The same integer sums either way.
    """
    return rewritten(model, apply_undo_space_to_depth_input_convs)


def apply_undo_space_to_depth_input_convs(model: onnx.ModelProto) -> None:
    graph = model.graph
    values = constant_values(graph)
    producers = producer_index(graph)
    consumers = consumer_index(graph)
    taken = set(values) | set(producers) | {node.name for node in graph.node}
    shapes = _static_shapes(model)
    undone: list[onnx.NodeProto] = []
    reshaped: set[str] = set()
    for node, data_dq, weight_dq in _convs_of_dequantized_inputs(graph, producers):
        moved = producers.get(data_dq.input[0])
        holder = _weight_holder(weight_dq, producers, values)
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        plain = (
            attributes.get("group", 1) == 1
            and list(attributes.get("dilations", [1, 1])) == [1, 1]
            and list(attributes.get("strides", [1, 1])) == [1, 1]
            and attributes.get("auto_pad", b"NOTSET") == b"NOTSET"
        )
        if moved is None or moved.op_type != "SpaceToDepth" or holder is None or not plain:
            continue
        if len(consumers[moved.output[0]]) != 1 or len(consumers[data_dq.output[0]]) != 1:
            continue
        stride = onnx.helper.get_attribute_value(next(a for a in moved.attribute if a.name == "blocksize"))
        blocks_weight = values[holder.input[0]]
        sides = shapes.get(moved.input[0], [None] * 4)[2:] or [None, None]
        kernel, pads = _strided_kernel(
            blocks_weight, stride, list(attributes.get("pads", [0, 0, 0, 0])), sides
        )
        weight_name = unique_name(taken, f"{holder.input[0]}_strided")
        taken.add(weight_name)
        graph.initializer.append(numpy_helper.from_array(kernel, weight_name))
        holder.input[0] = weight_name
        data_dq.input[0] = moved.input[0]
        undone.append(moved)
        reshaped.update((moved.output[0], data_dq.output[0], holder.output[0], weight_dq.output[0]))
        _set_attributes(node, kernel_shape=list(kernel.shape[2:]), strides=[stride, stride], pads=pads)
    for node in undone:
        graph.node.remove(node)
    forget_value_info(graph, reshaped)
    remove_dead_nodes(graph)  # the blocks weights


def _strided_kernel(
    blocks_weight: np.ndarray, stride: int, block_pads: list[int], sides: list[int | None]
) -> tuple[np.ndarray, list[int]]:
    """The stride-``stride`` kernel and pads equal to a stride-1 conv of ``blocks_weight`` over
    SpaceToDepth(``stride``) blocks padded by ``block_pads`` (see :func:`_blocks_conv` for the layout),
    for an input of ``sides`` (None where unknown)."""
    cout, channels, rows, columns = blocks_weight.shape
    cin = channels // (stride * stride)
    # channel (dy * s + dx) * cin + c of block (by, bx) is tap (by * s + dy, bx * s + dx) of channel c
    kernel = (
        blocks_weight.reshape(cout, stride, stride, cin, rows, columns)
        .transpose(0, 3, 4, 1, 5, 2)
        .reshape(cout, cin, rows * stride, columns * stride)
    )
    pads = [pad * stride for pad in block_pads]
    for axis in range(2):  # trim all-zero tap rows (axis 0) / columns (axis 1)
        used = np.moveaxis(kernel, 2 + axis, 0).reshape(kernel.shape[2 + axis], -1).any(axis=1)
        begin, end = 0, len(used)
        # A leading zero tap goes with one pad in front: every output reads the same input rows.
        while begin < end - 1 and not used[begin] and pads[axis] > 0:
            begin, pads[axis] = begin + 1, pads[axis] - 1
        # A trailing one goes with one pad behind, or alone where the output keeps its size.
        while begin < end - 1 and not used[end - 1]:
            if pads[axis + 2] > 0:
                pads[axis + 2] -= 1
            elif sides[axis] is None or _outputs(
                sides[axis], pads, axis, end - begin - 1, stride
            ) != _outputs(sides[axis], pads, axis, end - begin, stride):
                break
            end -= 1
        kernel = kernel[:, :, begin:end, :] if axis == 0 else kernel[:, :, :, begin:end]
    return np.ascontiguousarray(kernel), pads


def _outputs(side: int, pads: list[int], axis: int, taps: int, stride: int) -> int:
    return (side + pads[axis] + pads[axis + 2] - taps) // stride + 1
