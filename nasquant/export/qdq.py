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
* ``DQ -> Q`` on the same grid is bypassed, and twin quantizers of one tensor merge;
* every activation Q/DQ pair becomes uint8 with zero point ``z + 128`` and the same scale (s8 value
  ``v`` is u8 value ``v + 128``; rounding half to even commutes with adding an even integer);
* a strided conv on a few-channel input (the RGB stem) reads it through SpaceToDepth as a stride-1
  conv with rearranged int8 weights: the same sums on a kernel that is fast for many channels (on
  ONNX Runtime; the OpenVINO IR export turns it back into the strided conv, OpenVINO's fast path);
* a quantizer of a tensor that cannot be negative (a Relu's output, the image, a MaxPool, Concat or
  residual Add of such tensors) takes the unsigned grid of its calibrated range, ``[0, amax]`` in
  255 steps instead of the signed grid's 127, and ``Relu -> Q`` becomes that one quantizer. The only
  step that changes values, on purpose: twice the resolution at the same clipping point, which
  TensorRT's signed-only activations cannot have (measured on the shapes fixture: +0.11 mAP points
  on ONNX Runtime, +0.20 on OpenVINO). OpenVINO's integer convolutions also run faster without an
  input zero point (``benchmarks/openvino.md``).

ORT has no integer ConvTranspose on CPU: the neck's two upsampling ConvTransposes run in float between
their input quantizers and the output pair (which keeps the Concat after them integer).

The output-pair, requantization, uint8 and space-to-depth steps are bit-exact against the TensorRT
flavour (tested); the alpha fold differs by float rounding of a scale product; the unsigned grids
round the non-negative tensors twice as finely, so the CPU flavour stays closer to FP32 than the
TensorRT flavour does (tested).
ONNX Runtime's own ``quantize_static`` was measured as the alternative author of this graph
(``benchmarks/ort_quantizer.md``): fed only ModelOpt's ranges it quantizes 50 tensors on ranges of
its own and loses 0.10 points more; fed these passes' grids it matches them, at the same speed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from nasquant.artifacts import INPUT_NAME, KEY_FLAVOR
from nasquant.errors import NasquantError
from nasquant.export.conv_layouts import apply_space_to_depth_input_convs
from nasquant.export.graph import (
    GridWalker,
    constant_values,
    consumer_index,
    forget_value_info,
    producer_index,
    quantizer_grid,
    quantizer_zero_point,
    remove_dead_nodes,
    rewire,
    rewritten,
    same_grid,
    splice,
    unique_name,
)
from nasquant.export.onnx_files import load_onnx, save_onnx

UINT8_SHIFT = 128


def to_uint8_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose activation Q/DQ pairs are uint8 (zero point + 128, same scales).

    Weight Q/DQ (input is an initializer or Constant) keep their signed int8 zero points. Activation
    zero points that are already uint8 are left alone, so applying this twice changes nothing.
    The result passes ``onnx.checker`` with full type inference.
    """
    return rewritten(model, _to_uint8_activations)


def _to_uint8_activations(model: onnx.ModelProto) -> None:
    graph = model.graph
    values = constant_values(graph)
    consumers = consumer_index(graph)
    taken = set(values) | set(producer_index(graph))
    retyped: set[str] = set()

    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in values:
            continue
        zero = quantizer_zero_point(node, values)
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
            user_zero = quantizer_zero_point(user, values)
            if user_zero is None or not np.array_equal(user_zero, zero):
                raise NasquantError(f"{node.name}: its DequantizeLinear {user.name} uses another zero point")
        # One zero point per pair, as ModelOpt has it. A single shared one lets ORT's common
        # subexpression elimination merge quantizers and then fuse differently than for the signed
        # graph (measured: int32-quantized biases on some convs), and the flavours stop agreeing.
        shifted = (zero.astype(np.int16) + UINT8_SHIFT).astype(np.uint8)
        name = unique_name(taken, f"{node.output[0]}_zero_point_uint8")
        graph.initializer.append(numpy_helper.from_array(shifted, name))
        for quant_node in (node, *users):
            quant_node.input[2] = name
        retyped.add(node.output[0])
        for attribute in node.attribute:
            # opset 21 may also state the output type explicitly; it must agree with the zero point
            if attribute.name == "output_dtype":
                attribute.i = TensorProto.UINT8

    remove_dead_nodes(graph)  # the int8 zero points no quantizer reads any more
    # A simplifier (onnxslim) records inferred types in value_info: the rewritten quantized
    # tensors are uint8 now, so their stale int8 entries must go before type checking.
    forget_value_info(graph, retyped)


def quantize_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with a Q/DQ pair after every quantized conv or add where that changes no value.

    A conv qualifies when its data and weight inputs come from DequantizeLinear, an Add when all its
    inputs do; the pair goes after the node, or after its Relu when that is the node's only user
    (Relu commutes with a monotone quantizer), and only where every consumer path of that tensor ends,
    through grid-preserving ops only, in QuantizeLinear nodes that share one per-tensor scale and
    zero point: the new pair copies those.
    """
    return rewritten(model, _quantize_outputs)


def _quantize_outputs(model: onnx.ModelProto) -> None:
    graph = model.graph
    values = constant_values(graph)
    producers = producer_index(graph)
    consumers = consumer_index(graph)
    outputs = {out.name for out in graph.output}
    taken = set(values) | set(producers) | {node.name for node in graph.node}  # tensor and node names
    grids = GridWalker(values, consumers, outputs)

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
    splice(graph, added)


def _copies(computed: list[onnx.NodeProto], taken: set[str]) -> list[onnx.NodeProto]:
    """A copy of the chain ``computed`` (a node, maybe its Relu) with fresh output and node names."""
    copies: list[onnx.NodeProto] = []
    renamed: dict[str, str] = {}
    for node in computed:
        copy_ = onnx.NodeProto()
        copy_.CopyFrom(node)
        copy_.name = unique_name(taken, f"{node.name or node.output[0]}_per_grid")
        for index, name in enumerate(copy_.input):
            copy_.input[index] = renamed.get(name, name)
        for index, name in enumerate(copy_.output):
            renamed[name] = copy_.output[index] = unique_name(taken, f"{name}_per_grid")
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
    scale, zero = (unique_name(taken, f"{source}_output_{part}") for part in ("scale", "zero_point"))
    graph.initializer.extend(
        [
            numpy_helper.from_array(values[quantizer.input[1]], scale),
            numpy_helper.from_array(values[quantizer.input[2]], zero),
        ]
    )
    quantized, dequantized = (unique_name(taken, f"{source}_{op}") for op in ("quantized", "dequantized"))
    for reader in readers:
        for index, name in enumerate(reader.input):
            if name == anchor:
                reader.input[index] = dequantized
    prefix = producer.name.rsplit("/", 1)[0] if producer.name else source
    q_name, dq_name = (
        unique_name(taken, f"{prefix}/output_quantizer/{op}") for op in ("QuantizeLinear", "DequantizeLinear")
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


def fold_scalar_multipliers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where ``DequantizeLinear -> Mul(positive scalar constant)`` is one DQ.

    ``(q - z) * s * c`` is ``(q - z) * (s * c)`` up to float rounding of the product, and ONNX
    Runtime only fuses an Add into integer math when its inputs come straight from DequantizeLinear
    (YOLO-NAS scales every residual by a learned ``alpha``).
    """
    return rewritten(model, _fold_scalar_multipliers)


def _fold_scalar_multipliers(model: onnx.ModelProto) -> None:
    graph = model.graph
    values = constant_values(graph)
    producers = producer_index(graph)
    consumers = consumer_index(graph)
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
            name = unique_name(taken, f"{data}_scaled_scale")
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
        rewire(graph, node.output[0], node.input[0])
        graph.node.remove(node)


def drop_requantization(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where ``DequantizeLinear -> QuantizeLinear`` on the same grid is bypassed.

    Quantizing a dequantized value with the scale and zero point it came from returns the quantized
    value itself, so the QuantizeLinear's readers can read the original quantized tensor.
    """
    return rewritten(model, _drop_requantization)


def _drop_requantization(model: onnx.ModelProto) -> None:
    graph = model.graph
    values = constant_values(graph)
    producers = producer_index(graph)
    outputs = {out.name for out in graph.output}
    kept: dict[tuple, str] = {}  # (input, grid) -> the one quantized tensor for it
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.output[0] in outputs:
            continue
        source = producers.get(node.input[0])
        if source is not None and source.op_type == "DequantizeLinear" and same_grid(source, node, values):
            rewire(graph, node.output[0], source.input[0])
            continue
        # Two quantizers of one tensor on one grid (say, the 1x1 convs of a CSP layer reading the
        # same input) give the same values: keep one, so the producer has a single quantized user.
        grid = quantizer_grid(node, values)
        if grid is None:
            continue
        key = (node.input[0], *grid)
        if key in kept:
            rewire(graph, node.output[0], kept[key])
        else:
            kept[key] = node.output[0]
    remove_dead_nodes(graph)


#: Ops whose output is non-negative whatever their input.
_NONNEGATIVE_OPS = frozenset({"Relu", "Sigmoid", "Softmax", "Abs", "Exp"})
#: Ops whose output is non-negative when their data input (the first) is: they move or pick values.
_NONNEGATIVE_FROM_DATA = frozenset(
    {
        "MaxPool",
        "Reshape",
        "Transpose",
        "Slice",
        "Resize",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Identity",
        "SpaceToDepth",
        "DepthToSpace",
        "Split",
    }
)
#: Ops whose output is non-negative when every input is.
_NONNEGATIVE_FROM_ALL = frozenset({"Add", "Mul", "Concat", "Max", "Min", "AveragePool"})


def nonnegative_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the tensors of ``model`` that cannot be negative, by construction of the graph.

    The image input is non-negative by nasquant's input contract (pixels scaled to [0, 1]); constants
    by their values; a quantizer's output when its input is (rounding keeps the sign, so the integer
    is at least the zero point the DequantizeLinear subtracts); and the ops above by what they compute.
    """
    graph = model.graph
    values = constant_values(graph)
    nonnegative = {value.name for value in graph.input if value.name == INPUT_NAME}
    nonnegative |= {
        name for name, value in values.items() if value.dtype.kind in "fiu" and (value >= 0).all()
    }
    quantized_from: dict[str, onnx.NodeProto] = {}
    for node in graph.node:  # a valid ONNX graph lists its nodes in topological order
        data = [name for name in node.input if name]
        if node.op_type in _NONNEGATIVE_OPS:
            holds = True
        elif node.op_type in _NONNEGATIVE_FROM_DATA:
            holds = bool(data) and data[0] in nonnegative
        elif node.op_type in _NONNEGATIVE_FROM_ALL:
            holds = bool(data) and all(name in nonnegative for name in data)
        elif node.op_type == "QuantizeLinear":
            holds = False  # an integer tensor: its DequantizeLinear decides
            if node.input[0] in nonnegative:
                quantized_from[node.output[0]] = node
        elif node.op_type == "DequantizeLinear":
            source = quantized_from.get(node.input[0])
            holds = source is not None and _same_zero_point(source, node, values)
        else:
            holds = False
        if holds:
            nonnegative.update(node.output)
    return nonnegative


def _same_zero_point(a: onnx.NodeProto, b: onnx.NodeProto, values: dict[str, np.ndarray]) -> bool:
    za, zb = quantizer_zero_point(a, values), quantizer_zero_point(b, values)
    if za is None or zb is None:
        return za is None and zb is None
    return za.dtype == zb.dtype and np.array_equal(za, zb)


def unsigned_grids_for_nonnegative(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an unsigned-activation ``model`` where each quantizer of a tensor that cannot be
    negative (:func:`nonnegative_tensors`) takes the unsigned grid of its calibrated range, and a
    Relu that only feeds such a quantizer is dropped (the quantizer's clamping at 0 is the Relu).

    ModelOpt's signed grid spends half its 256 steps on negative values these tensors never take:
    ``[-amax, amax]`` in steps of ``amax / 127``. The unsigned grid covers ``[0, amax]`` in steps of
    ``amax / 255`` (zero point 0, scale times 127/255): the same clipping point, twice the resolution
    (TensorRT takes signed activations only, so its flavour cannot). ONNX Runtime then runs
    ``Conv -> Relu -> Q`` as one integer convolution, and OpenVINO's integer convolutions read an
    input with no zero point to compensate.
    """
    return rewritten(model, _unsigned_grids_for_nonnegative)


#: Scale factor from a signed grid's step (amax / 127) to the unsigned grid's (amax / 255).
SIGNED_TO_UNSIGNED_STEP = np.float32(127 / 255)


def _unsigned_grids_for_nonnegative(model: onnx.ModelProto) -> None:
    graph = model.graph
    nonnegative = nonnegative_tensors(model)
    values = constant_values(graph)
    consumers = consumer_index(graph)
    outputs = {out.name for out in graph.output}
    taken = set(values) | set(producer_index(graph))
    unsigned: set[str] = set()  # the quantizers moved to an unsigned grid
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in nonnegative:
            continue
        zero = quantizer_zero_point(node, values)
        if zero is None or zero.dtype != np.uint8 or zero.size != 1 or int(zero.reshape(())) != UINT8_SHIFT:
            continue
        zero_name = unique_name(taken, f"{node.output[0]}_zero_point_unsigned")
        taken.add(zero_name)
        graph.initializer.append(numpy_helper.from_array(np.zeros_like(zero), zero_name))
        for quant_node in (node, *consumers[node.output[0]]):
            # Each node its own scale: a DequantizeLinear may carry a folded multiplier (alpha).
            scale_name = unique_name(taken, f"{quant_node.name or quant_node.output[0]}_scale_unsigned")
            taken.add(scale_name)
            scale = (values[quant_node.input[1]] * SIGNED_TO_UNSIGNED_STEP).astype(np.float32)
            graph.initializer.append(numpy_helper.from_array(scale, scale_name))
            quant_node.input[1], quant_node.input[2] = scale_name, zero_name
        unsigned.add(node.output[0])
    folded: list[onnx.NodeProto] = []
    for node in graph.node:
        users = consumers[node.output[0]] if node.op_type == "Relu" else []
        if len(users) != 1 or users[0].output[0] not in unsigned or node.output[0] in outputs:
            continue
        users[0].input[0] = node.input[0]
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    remove_dead_nodes(graph)


#: The CPU flavour's rewrites, in the order they apply (each in place, on one copy of the graph).
CPU_FLAVOR_PASSES = (
    _drop_identity_casts,
    _fold_scalar_multipliers,
    _quantize_outputs,
    _drop_requantization,
    _to_uint8_activations,
    _unsigned_grids_for_nonnegative,
    apply_space_to_depth_input_convs,
)


def to_cpu_flavor(model: onnx.ModelProto) -> onnx.ModelProto:
    """The ONNX Runtime CPU flavour of a ModelOpt INT8 graph: integer kernels, the same grids.

    Every step but the unsigned grids is exact up to float rounding of a folded scale; those round
    non-negative tensors to twice as fine a grid over the same range (see
    :func:`unsigned_grids_for_nonnegative`).
    """
    return rewritten(model, *CPU_FLAVOR_PASSES)


def write_cpu_flavor(trt_path: str | os.PathLike, cpu_path: str | os.PathLike) -> Path:
    """Derive the CPU flavour file from a TensorRT-flavour INT8 ONNX file (metadata kept, flavour set)."""
    cpu = to_cpu_flavor(load_onnx(trt_path))
    return save_onnx(cpu, cpu_path, metadata={KEY_FLAVOR: "cpu"})
