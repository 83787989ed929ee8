"""Layouts that give ONNX Runtime's CPU provider integer kernels where the graph has none, part of
the CPU INT8 flavour (:mod:`nasquant.export.qdq` applies them in order):

* a quantized upsampling ConvTranspose (kernel = stride, no padding) becomes a 1x1 Conv with ``k*k``
  times the output channels, a Q/DQ pair on the output grid, and DepthToSpace: the same int8 weights
  and grid rearranged (ORT has no integer ConvTranspose on CPU, but an integer Conv and a
  DepthToSpace that moves uint8 values);
* a strided conv on a few-channel input (the RGB stem) reads it through SpaceToDepth as a stride-1
  conv with rearranged int8 weights: the same sums on a kernel that is fast for many channels.
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
    quantizer_axis,
    remove_dead_nodes,
    rewritten,
    splice,
    unique_name,
)


def pixel_shuffle_upsampling(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where each quantized upsampling ConvTranspose is a Conv and a DepthToSpace.

    A ConvTranspose whose kernel equals its stride (no padding, dilation or groups) writes each input
    pixel's ``k x k`` output block independently: ``y[o, k*i + a, k*j + b] = sum_c x[c, i, j] *
    w[c, o, a, b] + bias[o]``. That is a 1x1 Conv with output channel ``o*k*k + a*k + b`` followed by
    DepthToSpace(k, "CRD"). The int8 weight values and the per-output-channel scales move with their
    channel, and the output quantizer (which :func:`quantize_outputs` put there) is copied in front of
    the DepthToSpace, which only moves values: the result is the ConvTranspose's up to the float
    summation order, and on ONNX Runtime's CPU provider it runs as QLinearConv on integers.
    """
    return rewritten(model, apply_pixel_shuffle_upsampling)


def apply_pixel_shuffle_upsampling(model: onnx.ModelProto) -> None:
    graph = model.graph
    values = constant_values(graph)
    producers = producer_index(graph)
    consumers = consumer_index(graph)
    taken = set(values) | set(producers)
    replaced: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        block = _upsampling_block(node)
        users = consumers[node.output[0]]
        if block is None or len(users) != 1 or users[0].op_type != "QuantizeLinear":
            continue
        weight_q = _constant_quantizer(producers.get(node.input[1]), producers, values)
        if (
            weight_q is None
            or (len(node.input) > 2 and node.input[2] and node.input[2] not in values)
            or (
                values[weight_q.input[1]].size > 1 and quantizer_axis(weight_q) != 1
            )  # per output channel only
        ):
            continue
        replaced[node.output[0]] = _PixelShuffle(graph, values, taken, node, block).nodes(weight_q, users[0])
    if replaced:
        splice(graph, replaced)
        remove_dead_nodes(graph)


class _PixelShuffle:
    """The Conv + DepthToSpace nodes (and their new constants) that replace one upsampling ConvTranspose."""

    def __init__(
        self,
        graph: onnx.GraphProto,
        values: dict[str, np.ndarray],
        taken: set[str],
        node: onnx.NodeProto,
        block: int,
    ) -> None:
        self.graph, self.values, self.taken, self.node, self.block = graph, values, taken, node, block
        self.prefix = f"{node.name or node.output[0]}/pixel_shuffle"

    def nodes(self, weight_q: onnx.NodeProto, output_q: onnx.NodeProto) -> list[onnx.NodeProto]:
        node, copies = self.node, self.block * self.block
        weight = self.values[weight_q.input[0]]
        cin, cout = weight.shape[:2]
        conv_weight = self._constant("weight", weight.transpose(1, 2, 3, 0).reshape(cout * copies, cin, 1, 1))
        scale, zero = self._per_output(weight_q.input[1]), self._per_output(weight_q.input[2])
        axis = {"axis": 0} if self.values[weight_q.input[1]].size > 1 else {}
        quantized_weight, dequantized_weight, conv_out, conv_q, conv_dq = (
            unique_name(self.taken, f"{self.prefix}/{stem}")
            for stem in ("weight_quantized", "weight_dequantized", "conv_output", "quantized", "dequantized")
        )
        conv_inputs = [node.input[0], dequantized_weight]
        if len(node.input) > 2 and node.input[2]:
            conv_inputs.append(self._constant("bias", np.repeat(self.values[node.input[2]], copies)))
        grid = list(output_q.input[1:])
        return [
            onnx.helper.make_node("QuantizeLinear", [conv_weight, scale, zero], [quantized_weight], **axis),
            onnx.helper.make_node(
                "DequantizeLinear", [quantized_weight, scale, zero], [dequantized_weight], **axis
            ),
            onnx.helper.make_node(
                "Conv", conv_inputs, [conv_out], name=f"{self.prefix}/Conv", kernel_shape=[1, 1]
            ),
            onnx.helper.make_node(
                "QuantizeLinear", [conv_out, *grid], [conv_q], name=f"{self.prefix}/QuantizeLinear"
            ),
            onnx.helper.make_node(
                "DequantizeLinear", [conv_q, *grid], [conv_dq], name=f"{self.prefix}/DequantizeLinear"
            ),
            onnx.helper.make_node(
                "DepthToSpace",
                [conv_dq],
                [node.output[0]],
                name=f"{self.prefix}/DepthToSpace",
                blocksize=self.block,
                mode="CRD",
            ),
        ]

    def _constant(self, stem: str, array: np.ndarray) -> str:
        name = unique_name(self.taken, f"{self.prefix}/{stem}")
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def _per_output(self, name: str) -> str:
        """A per-output-channel constant repeated for the ``k*k`` Conv channels of each output channel."""
        array = self.values[name]
        if array.size == 1:
            return name
        return self._constant(name.rsplit("/", 1)[-1], np.repeat(array, self.block * self.block))


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
        weight_q = _constant_quantizer(weight_dq, producers, values)
        per_tensor = values.get(data_dq.input[1]) is not None and values[data_dq.input[1]].size == 1
        if weight_q is None or not per_tensor or len(consumers[data_dq.output[0]]) != 1:
            continue
        weight = values[weight_q.input[0]]
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
        reshaped.update((data_dq.output[0], weight_q.output[0], weight_dq.output[0]))
        weight_name = unique_name(taken, f"{weight_q.input[0]}_space_to_depth")
        graph.initializer.append(numpy_helper.from_array(blocks_weight, weight_name))
        weight_q.input[0] = weight_name
        attributes = {"kernel_shape": list(blocks_weight.shape[2:]), "strides": [1, 1], "pads": pads}
        kept = [a for a in node.attribute if a.name not in attributes]
        del node.attribute[:]
        node.attribute.extend([*kept, *(onnx.helper.make_attribute(k, v) for k, v in attributes.items())])
    splice(graph, inserted)
    forget_value_info(graph, reshaped)
    remove_dead_nodes(graph)  # the conv's original float weight, which nothing reads now


def _constant_quantizer(
    dequantize: onnx.NodeProto | None, producers: dict[str, onnx.NodeProto], values: dict[str, np.ndarray]
) -> onnx.NodeProto | None:
    """The QuantizeLinear of a constant that ``dequantize`` reads, if it reads one (ModelOpt's weights)."""
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return None
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


def _upsampling_block(node: onnx.NodeProto) -> int | None:
    """``k`` for a 2-D ConvTranspose with kernel = stride = ``k`` and no padding, dilation or groups."""
    if node.op_type != "ConvTranspose":
        return None
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    kernel = list(attributes.get("kernel_shape", []))
    neutral = (
        list(attributes.get("dilations", [1, 1])) == [1, 1]
        and attributes.get("group", 1) == 1
        and not any(attributes.get("pads", []))
        and not any(attributes.get("output_padding", []))
        and "output_shape" not in attributes
        and attributes.get("auto_pad", b"NOTSET") == b"NOTSET"
    )
    if (
        not neutral
        or len(kernel) != 2
        or kernel != list(attributes.get("strides", []))
        or kernel[0] != kernel[1]
    ):
        return None
    return int(kernel[0]) if kernel[0] > 1 else None
