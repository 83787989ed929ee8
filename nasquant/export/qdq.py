"""Two INT8 ONNX flavours from one ModelOpt calibration.

ModelOpt exports symmetric *signed* int8 Q/DQ: per output channel on weights (the float weight is an
initializer feeding QuantizeLinear -> DequantizeLinear) and per tensor on every conv input and both
residual-Add operands, zero point 0. That is what TensorRT wants (``*.int8.trt.onnx``) and it is kept
as is.

ONNX Runtime's CPU provider fuses ``DQ -> op -> Q`` into integer kernels (QLinearConv, QLinearAdd,
QLinearConcat) only when each op's inputs come straight from DequantizeLinear and its output goes
straight into one QuantizeLinear, and its x86 kernels want unsigned activations. The CPU flavour
(``*.int8.cpu.onnx``) rewrites the graph into that shape without adding a quantizer of its own:

* float-to-float Casts that ModelOpt's export puts between quantizers are removed;
* ``DQ -> Mul(positive scalar)`` (the bottleneck's ``alpha``) becomes one DQ with a scaled scale;
* a Q/DQ pair goes after a quantized conv (after its Relu) or Add where every consumer path ends in
  quantizers of one grid through Relu / MaxPool / Concat / reshapes, which commute with a monotone
  quantizer: the pair rounds to the grid the consumers round to anyway; where the readers end in
  different grids, the conv is computed once per grid, each copy with its own pair;
* a quantized upsampling ConvTranspose (kernel = stride, no padding) becomes a 1x1 Conv with
  ``k*k`` times the output channels, a Q/DQ pair on the output grid, and DepthToSpace: the same int8
  weights and grid rearranged (ORT has no integer ConvTranspose on CPU, but an integer Conv and a
  DepthToSpace that moves uint8 values);
* ``DQ -> Q`` on the same grid is bypassed, and twin quantizers of one tensor merge;
* every activation Q/DQ pair becomes uint8 with zero point ``z + 128`` and the same scale (s8 value
  ``v`` is u8 value ``v + 128``; rounding half to even commutes with adding an even integer);
* a strided conv on a few-channel input (the RGB stem) reads it through SpaceToDepth as a stride-1
  conv with rearranged int8 weights: the same sums on a kernel that is fast for many channels;
* ``Relu -> Q`` becomes one quantizer with zero point 0: the only step that changes a value, and only
  above ``127.5 * scale`` where the signed grid saturates and this one goes on to 255.

The output-pair, requantization, uint8 and space-to-depth steps are bit-exact against the TensorRT flavour (tested);
the alpha fold differs by float rounding of a scale product, the upsampling rewrite by float
summation order, the Relu fold only beyond the calibrated range, so the two flavours give the same
detections to rounding (tested).
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from nasquant.artifacts import KEY_FLAVOR
from nasquant.errors import NasquantError
from nasquant.export.onnx_files import load_onnx, save_onnx

UINT8_SHIFT = 128


def count_qdq(model: onnx.ModelProto) -> dict[str, int]:
    """Q/DQ node counts of the main graph.

    ``QuantizeLinear`` / ``DequantizeLinear``: node counts. ``weight_dq`` / ``activation_dq``: the
    DequantizeLinear nodes whose quantized input is a constant (directly, or through a QuantizeLinear
    of a constant) versus a runtime tensor.
    """
    graph = model.graph
    constants = _constant_names(graph)
    producers = _producers(graph)
    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0, "weight_dq": 0, "activation_dq": 0}
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            counts[node.op_type] += 1
        if node.op_type == "DequantizeLinear":
            source = producers.get(node.input[0])
            quantized_constant = node.input[0] in constants or (
                source is not None and source.op_type == "QuantizeLinear" and source.input[0] in constants
            )
            counts["weight_dq" if quantized_constant else "activation_dq"] += 1
    return counts


def to_uint8_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose activation Q/DQ pairs are uint8 (zero point + 128, same scales).

    Weight Q/DQ (input is an initializer or Constant) keep their signed int8 zero points. Activation
    zero points that are already uint8 are left alone, so applying this twice changes nothing.
    The result passes ``onnx.checker`` with full type inference.
    """
    return _rewritten(model, _to_uint8_activations)


def _to_uint8_activations(model: onnx.ModelProto) -> None:
    graph = model.graph
    values = _constant_values(graph)
    consumers = _consumers(graph)
    taken = set(values) | set(_producers(graph))
    retyped: set[str] = set()

    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in values:
            continue
        zero = _zero_point(node, values)
        if zero is None or zero.dtype == np.uint8:
            continue  # no zero point means uint8 0 by the ONNX spec
        if zero.dtype != np.int8:
            raise NasquantError(f"{node.name}: only int8 activations can become uint8, found {zero.dtype}")
        users = consumers[node.output[0]]
        for user in users:
            if user.op_type != "DequantizeLinear":
                raise NasquantError(
                    f"{node.name}: quantized output feeds {user.op_type}, not DequantizeLinear"
                )
            user_zero = _zero_point(user, values)
            if user_zero is None or not np.array_equal(user_zero, zero):
                raise NasquantError(f"{node.name}: its DequantizeLinear {user.name} uses another zero point")
        # One zero point per pair, as ModelOpt has it. A single shared one lets ORT's common
        # subexpression elimination merge quantizers and then fuse differently than for the signed
        # graph (measured: int32-quantized biases on some convs), and the flavours stop agreeing.
        shifted = (zero.astype(np.int16) + UINT8_SHIFT).astype(np.uint8)
        name = _unique_name(taken, f"{node.output[0]}_zero_point_uint8")
        graph.initializer.append(numpy_helper.from_array(shifted, name))
        for quant_node in (node, *users):
            quant_node.input[2] = name
        retyped.add(node.output[0])
        for attribute in node.attribute:
            # opset 21 may also state the output type explicitly; it must agree with the zero point
            if attribute.name == "output_dtype":
                attribute.i = TensorProto.UINT8

    _remove_dead_nodes(graph)  # the int8 zero points no quantizer reads any more
    # A simplifier (onnxslim) records inferred types in value_info: the rewritten quantized
    # tensors are uint8 now, so their stale int8 entries must go before type checking.
    _forget_value_info(graph, retyped)


def quantize_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with a Q/DQ pair after every quantized conv or add where that changes no value.

    A conv qualifies when its data and weight inputs come from DequantizeLinear, an Add when all its
    inputs do; the pair goes after the node, or after its Relu when that is the node's only user
    (Relu commutes with a monotone quantizer), and only where every consumer path of that tensor ends,
    through grid-preserving ops only, in QuantizeLinear nodes that share one per-tensor scale and
    zero point: the new pair copies those.
    """
    return _rewritten(model, _quantize_outputs)


def _quantize_outputs(model: onnx.ModelProto) -> None:
    graph = model.graph
    values = _constant_values(graph)
    producers = _producers(graph)
    consumers = _consumers(graph)
    outputs = {out.name for out in graph.output}
    taken = set(values) | set(producers) | {node.name for node in graph.node}  # tensor and node names
    grids = _GridWalker(values, consumers, outputs)

    added: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if not _integer_candidate(node, producers):
            continue
        computed = [node]
        users = consumers[node.output[0]]
        if len(users) == 1 and users[0].op_type == "Relu" and node.output[0] not in outputs:
            computed.append(users[0])
        anchor = computed[-1].output[0]
        users = consumers[anchor]
        if len(users) == 1 and users[0].op_type == "QuantizeLinear":
            continue  # already quantized by its one consumer
        groups = grids.groups(anchor)
        if groups is None:
            continue
        # One grid: a pair after the tensor. Several (a lateral conv read by two stages with
        # different input ranges): one integer copy of the computation per grid, each exact.
        inserted: list[onnx.NodeProto] = []
        for index, (quantizer, readers) in enumerate(groups):
            copies = computed if index == 0 else _copies(computed, taken)
            if index > 0:
                inserted.extend(copies)
            inserted.extend(_output_pair(graph, values, taken, copies[-1], quantizer, anchor, readers))
        added[anchor] = [computed[-1], *inserted]  # new nodes right after the tensor's producer
    _splice(graph, added)


def _copies(computed: list[onnx.NodeProto], taken: set[str]) -> list[onnx.NodeProto]:
    """A copy of the chain ``computed`` (a node, maybe its Relu) with fresh output and node names."""
    copies: list[onnx.NodeProto] = []
    renamed: dict[str, str] = {}
    for node in computed:
        copy_ = onnx.NodeProto()
        copy_.CopyFrom(node)
        copy_.name = _unique_name(taken, f"{node.name or node.output[0]}_per_grid")
        for index, name in enumerate(copy_.input):
            copy_.input[index] = renamed.get(name, name)
        for index, name in enumerate(copy_.output):
            renamed[name] = copy_.output[index] = _unique_name(taken, f"{name}_per_grid")
        copies.append(copy_)
    return copies


def _output_pair(
    graph: onnx.GraphProto,
    values: dict[str, np.ndarray],
    taken: set[str],
    producer: onnx.NodeProto,
    quantizer: onnx.NodeProto,
    anchor: str,
    readers: list[onnx.NodeProto],
) -> list[onnx.NodeProto]:
    """A Q/DQ pair on ``quantizer``'s grid after ``producer``, read by ``readers`` instead of ``anchor``."""
    source = producer.output[0]
    scale, zero = (_unique_name(taken, f"{source}_output_{part}") for part in ("scale", "zero_point"))
    graph.initializer.extend(
        [
            numpy_helper.from_array(values[quantizer.input[1]], scale),
            numpy_helper.from_array(values[quantizer.input[2]], zero),
        ]
    )
    quantized, dequantized = (_unique_name(taken, f"{source}_{op}") for op in ("quantized", "dequantized"))
    for reader in readers:
        for index, name in enumerate(reader.input):
            if name == anchor:
                reader.input[index] = dequantized
    prefix = producer.name.rsplit("/", 1)[0] if producer.name else source
    q_name, dq_name = (
        _unique_name(taken, f"{prefix}/output_quantizer/{op}")
        for op in ("QuantizeLinear", "DequantizeLinear")
    )
    return [
        onnx.helper.make_node("QuantizeLinear", [source, scale, zero], [quantized], name=q_name),
        onnx.helper.make_node("DequantizeLinear", [quantized, scale, zero], [dequantized], name=dq_name),
    ]


def _integer_candidate(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> bool:
    """A node ONNX Runtime runs on integers once its output is quantized too."""
    if node.op_type in ("Conv", "ConvTranspose"):
        inputs = node.input[:2]
    elif node.op_type == "Add":
        inputs = node.input
    else:
        return False
    sources = [producers.get(name) for name in inputs]
    return all(source is not None and source.op_type == "DequantizeLinear" for source in sources)


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
    return _rewritten(model, _pixel_shuffle_upsampling)


def _pixel_shuffle_upsampling(model: onnx.ModelProto) -> None:
    graph = model.graph
    values = _constant_values(graph)
    producers = _producers(graph)
    consumers = _consumers(graph)
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
            or (values[weight_q.input[1]].size > 1 and _axis(weight_q) != 1)  # per output channel only
        ):
            continue
        replaced[node.output[0]] = _PixelShuffle(graph, values, taken, node, block).nodes(weight_q, users[0])
    if replaced:
        _splice(graph, replaced)
        _remove_dead_nodes(graph)


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
            _unique_name(self.taken, f"{self.prefix}/{stem}")
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
        name = _unique_name(self.taken, f"{self.prefix}/{stem}")
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
    return _rewritten(model, _space_to_depth_input_convs)


#: input channel count at or below which a strided integer conv reads its input space-to-depth
_FEW_CHANNELS = 4


def _space_to_depth_input_convs(model: onnx.ModelProto) -> None:
    graph = model.graph
    values = _constant_values(graph)
    producers = _producers(graph)
    consumers = _consumers(graph)
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
        moved = _unique_name(taken, f"{data_dq.input[0]}_space_to_depth")
        space_to_depth = onnx.helper.make_node(
            "SpaceToDepth",
            [data_dq.input[0]],
            [moved],
            name=_unique_name(taken, f"{node.name or node.output[0]}/SpaceToDepth"),
            blocksize=stride,
        )
        inserted[data_dq.output[0]] = [space_to_depth, data_dq]
        data_dq.input[0] = moved
        reshaped.update((data_dq.output[0], weight_q.output[0], weight_dq.output[0]))
        weight_name = _unique_name(taken, f"{weight_q.input[0]}_space_to_depth")
        graph.initializer.append(numpy_helper.from_array(blocks_weight, weight_name))
        weight_q.input[0] = weight_name
        attributes = {"kernel_shape": list(blocks_weight.shape[2:]), "strides": [1, 1], "pads": pads}
        kept = [a for a in node.attribute if a.name not in attributes]
        del node.attribute[:]
        node.attribute.extend([*kept, *(onnx.helper.make_attribute(k, v) for k, v in attributes.items())])
    _splice(graph, inserted)
    _forget_value_info(graph, reshaped)


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


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def fold_scalar_multipliers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where ``DequantizeLinear -> Mul(positive scalar constant)`` is one DQ.

    ``(q - z) * s * c`` is ``(q - z) * (s * c)`` up to float rounding of the product, and ONNX
    Runtime only fuses an Add into integer math when its inputs come straight from DequantizeLinear
    (YOLO-NAS scales every residual by a learned ``alpha``).
    """
    return _rewritten(model, _fold_scalar_multipliers)


def _fold_scalar_multipliers(model: onnx.ModelProto) -> None:
    graph = model.graph
    values = _constant_values(graph)
    producers = _producers(graph)
    consumers = _consumers(graph)
    outputs = {out.name for out in graph.output}
    taken = set(values) | set(producers)
    folded: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "Mul":
            continue
        for data, factor in (node.input, node.input[::-1]):
            source = producers.get(data)
            constant = values.get(factor)
            if (
                source is None
                or source.op_type != "DequantizeLinear"
                or len(consumers[data]) != 1
                or data in outputs
                or constant is None
                or constant.size != 1
                or not np.isfinite(constant).all()
                or float(constant.reshape(())) <= 0
                or values.get(source.input[1]) is None
                or values[source.input[1]].size != 1
            ):
                continue
            scale = (values[source.input[1]].astype(np.float32) * np.float32(constant.reshape(()))).astype(
                np.float32
            )
            name = _unique_name(taken, f"{data}_scaled_scale")
            graph.initializer.append(
                numpy_helper.from_array(scale.reshape(values[source.input[1]].shape), name)
            )
            source.input[1] = name
            source.output[0] = node.output[0]  # the Mul was the DQ's only reader: take its place
            folded.append(node)
            break
    for node in folded:
        graph.node.remove(node)


def _drop_identity_casts(model: onnx.ModelProto) -> None:
    """Remove float-to-float Casts (ModelOpt's quantizer export emits some) so Q/DQ pairs meet."""
    graph = model.graph
    float_tensors = {
        info.name
        for info in (*onnx.shape_inference.infer_shapes(model).graph.value_info, *graph.input)
        if info.type.tensor_type.elem_type == TensorProto.FLOAT
    }
    outputs = {out.name for out in graph.output}
    identities = [
        node
        for node in graph.node
        if node.op_type == "Cast"
        and node.input[0] in float_tensors
        and node.output[0] not in outputs
        and any(a.name == "to" and a.i == TensorProto.FLOAT for a in node.attribute)
    ]
    for node in identities:
        _rewire(graph, node.output[0], node.input[0])
        graph.node.remove(node)


def drop_requantization(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where ``DequantizeLinear -> QuantizeLinear`` on the same grid is bypassed.

    Quantizing a dequantized value with the scale and zero point it came from returns the quantized
    value itself, so the QuantizeLinear's readers can read the original quantized tensor.
    """
    return _rewritten(model, _drop_requantization)


def _drop_requantization(model: onnx.ModelProto) -> None:
    graph = model.graph
    values = _constant_values(graph)
    producers = _producers(graph)
    outputs = {out.name for out in graph.output}
    kept: dict[tuple, str] = {}  # (input, grid) -> the one quantized tensor for it
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.output[0] in outputs:
            continue
        source = producers.get(node.input[0])
        if source is not None and source.op_type == "DequantizeLinear" and _same_grid(source, node, values):
            _rewire(graph, node.output[0], source.input[0])
            continue
        # Two quantizers of one tensor on one grid (say, the 1x1 convs of a CSP layer reading the
        # same input) give the same values: keep one, so the producer has a single quantized user.
        grid = _grid(node, values)
        if grid is None:
            continue
        key = (node.input[0], *grid)
        if key in kept:
            _rewire(graph, node.output[0], kept[key])
        else:
            kept[key] = node.output[0]
    _remove_dead_nodes(graph)


def _grid(node: onnx.NodeProto, values: dict[str, np.ndarray]) -> tuple | None:
    """A per-tensor Q/DQ node's (scale, zero point) as a hashable value, or None if it is not one."""
    scale = values.get(node.input[1])
    zero = values.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scale is None or zero is None or scale.size != 1 or zero.size != 1:
        return None
    return (float(scale.astype(np.float32).reshape(())), zero.dtype.str, int(zero.reshape(())))


def _same_grid(dequantize: onnx.NodeProto, quantize: onnx.NodeProto, values: dict[str, np.ndarray]) -> bool:
    grid = _grid(dequantize, values)
    return grid is not None and grid == _grid(quantize, values)


def fold_relu_into_quantize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an unsigned-activation ``model`` where ``Relu -> QuantizeLinear`` is one quantizer.

    On the unsigned grid the quantizer after a Relu takes zero point 0 instead of 128, so its
    rounding and clamping at 0 is the Relu: identical below ``127.5 * scale``, where the signed grid
    saturates at 127 while this one goes on to 255 (it clips later, never earlier). ONNX Runtime
    then runs ``Conv -> Relu -> Q`` as one integer convolution instead of a float Relu between a
    DequantizeLinear and a QuantizeLinear.
    """
    return _rewritten(model, _fold_relu_into_quantize)


def _fold_relu_into_quantize(model: onnx.ModelProto) -> None:
    graph = model.graph
    values = _constant_values(graph)
    consumers = _consumers(graph)
    outputs = {out.name for out in graph.output}
    taken = set(values) | set(_producers(graph))
    folded: list[onnx.NodeProto] = []
    for node in graph.node:
        users = consumers[node.output[0]] if node.op_type == "Relu" else []
        if len(users) != 1 or users[0].op_type != "QuantizeLinear" or node.output[0] in outputs:
            continue
        quantizer = users[0]
        zero = _zero_point(quantizer, values)
        if zero is None or zero.dtype != np.uint8 or zero.size != 1 or int(zero.reshape(())) != UINT8_SHIFT:
            continue
        name = _unique_name(taken, f"{quantizer.output[0]}_zero_point_relu")
        graph.initializer.append(numpy_helper.from_array(np.zeros_like(zero), name))
        for quant_node in (quantizer, *consumers[quantizer.output[0]]):
            quant_node.input[2] = name
        quantizer.input[0] = node.input[0]
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    _remove_dead_nodes(graph)


def to_cpu_flavor(model: onnx.ModelProto) -> onnx.ModelProto:
    """The ONNX Runtime CPU flavour of a ModelOpt INT8 graph: integer kernels, the same grids.

    Every step but the Relu fold is exact up to float rounding of a folded scale; the Relu fold only
    lets post-Relu values above the calibrated range clip later (see :func:`fold_relu_into_quantize`).
    """
    return _rewritten(
        model,
        _drop_identity_casts,
        _fold_scalar_multipliers,
        _quantize_outputs,
        _pixel_shuffle_upsampling,
        _drop_requantization,
        _to_uint8_activations,
        _fold_relu_into_quantize,
        _space_to_depth_input_convs,
    )


def _rewritten(model: onnx.ModelProto, *passes: Callable[[onnx.ModelProto], None]) -> onnx.ModelProto:
    """A copy of ``model`` with the in-place ``passes`` applied in order, checked with full type inference."""
    model = copy.deepcopy(model)
    for rewrite in passes:
        rewrite(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def write_cpu_flavor(trt_path: str | os.PathLike, cpu_path: str | os.PathLike) -> Path:
    """Derive the CPU flavour file from a TensorRT-flavour INT8 ONNX file (metadata kept, flavour set)."""
    cpu = to_cpu_flavor(load_onnx(trt_path))
    return save_onnx(cpu, cpu_path, metadata={KEY_FLAVOR: "cpu"})


#: ops that map quantizer-grid values to grid values and commute with a monotone quantizer
_GRID_PRESERVING = frozenset(
    {"Relu", "MaxPool", "Concat", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"}
)


#: ops that read only a tensor's shape, never its values
_SHAPE_ONLY = frozenset({"Shape", "Size"})


class _GridWalker:
    """Finds, for a tensor, the per-tensor grid every path from each of its readers ends in."""

    def __init__(
        self, values: dict[str, np.ndarray], consumers: dict[str, list[onnx.NodeProto]], outputs: set[str]
    ) -> None:
        self.values, self.consumers, self.outputs = values, consumers, outputs
        self._memo: dict[str, onnx.NodeProto | None] = {}

    def target(self, tensor: str) -> onnx.NodeProto | None:
        """A QuantizeLinear on the one grid that every path from ``tensor`` ends in, else None."""
        if tensor not in self._memo:
            groups = self.groups(tensor)
            self._memo[tensor] = groups[0][0] if groups is not None and len(groups) == 1 else None
        return self._memo[tensor]

    def groups(self, tensor: str) -> list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] | None:
        """``tensor``'s readers grouped by the one grid each one's paths end in (a QuantizeLinear on
        it, readers), or None when a path leaves the quantized graph or a reader's paths disagree."""
        users = self.consumers[tensor]
        if tensor in self.outputs or not users:
            return None
        grouped: dict[tuple, tuple[onnx.NodeProto, list[onnx.NodeProto]]] = {}
        shape_readers = [user for user in users if user.op_type in _SHAPE_ONLY]
        for user in users:
            if user.op_type in _SHAPE_ONLY:
                continue
            if user.op_type == "QuantizeLinear" and user.input[0] == tensor:
                found: onnx.NodeProto | None = user
            elif self._passes(user, tensor):
                found = self.target(user.output[0])
            else:
                return None
            grid = None if found is None else _grid(found, self.values)
            if grid is None:
                return None
            if grid not in grouped:
                grouped[grid] = (found, [])
            if all(reader is not user for reader in grouped[grid][1]):  # a reader may read it twice
                grouped[grid][1].append(user)
        if not grouped:
            return None
        # A dynamic-batch graph reads some shapes at run time: any copy of the tensor has the shape.
        first = next(iter(grouped.values()))
        first[1].extend(shape_readers)
        return list(grouped.values())

    def _passes(self, node: onnx.NodeProto, tensor: str) -> bool:
        # Only as data: a tensor used as, say, Reshape's target shape is not carried through.
        data_inputs = node.input if node.op_type == "Concat" else node.input[:1]
        if tensor not in data_inputs or tensor in node.input[len(data_inputs) :]:
            return False
        # Walking down from a float conv output, a Cast to float is a no-op (ModelOpt emits some).
        grid_op = node.op_type in _GRID_PRESERVING or (
            node.op_type == "Cast"
            and any(a.name == "to" and a.i == TensorProto.FLOAT for a in node.attribute)
        )
        # MaxPool's optional Indices output would expose positions, not values.
        extra_outputs_used = any(self.consumers[out] or out in self.outputs for out in node.output[1:])
        return grid_op and not extra_outputs_used


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    return consumers


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    names = {init.name for init in graph.initializer}
    names.update(node.output[0] for node in graph.node if node.op_type == "Constant")
    return names


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            # The exporter writes zero points and scales as tensor-valued Constant nodes.
            tensor = next((a.t for a in node.attribute if a.name == "value"), None)
            if tensor is not None:
                values[node.output[0]] = numpy_helper.to_array(tensor)
    return values


def _zero_point(node: onnx.NodeProto, values: dict[str, np.ndarray]) -> np.ndarray | None:
    if len(node.input) < 3 or not node.input[2]:
        return None
    if node.input[2] not in values:
        raise NasquantError(f"{node.name}: zero point {node.input[2]!r} is not a constant")
    return values[node.input[2]]


def _unique_name(taken: set[str], stem: str) -> str:
    name, index = stem, 0
    while name in taken:
        index += 1
        name = f"{stem}_{index}"
    taken.add(name)
    return name


def _splice(graph: onnx.GraphProto, replacements: dict[str, list[onnx.NodeProto]]) -> None:
    """Replace each node whose first output is a key by that key's node list, in place, keeping the
    node list topologically sorted (the lists include the node itself where it stays)."""
    if not replacements:
        return
    ordered = [new for node in graph.node for new in replacements.get(node.output[0], [node])]
    del graph.node[:]
    graph.node.extend(ordered)


def _forget_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    """Drop recorded types/shapes of ``names``, made stale by a rewrite, before type checking."""
    stale = [info for info in graph.value_info if info.name in names]
    for info in stale:
        graph.value_info.remove(info)


def _rewire(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Make every reader of tensor ``old`` read ``new`` instead."""
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new


def _remove_dead_nodes(graph: onnx.GraphProto) -> None:
    """Drop nodes none of whose outputs is read or a graph output, then unread initializers."""
    outputs = {out.name for out in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [node for node in graph.node if not any(out in read for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
