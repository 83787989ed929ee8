"""Two INT8 ONNX flavours from one ModelOpt calibration.

ModelOpt exports symmetric *signed* int8 Q/DQ: per output channel on weights (the float weight is an
initializer feeding QuantizeLinear -> DequantizeLinear) and per tensor on every conv input, zero
point 0. That is what TensorRT wants (``*.int8.trt.onnx``) and it is kept as is.

ONNX Runtime's CPU provider needs two things to run such a graph on integer kernels, and the CPU
flavour (``*.int8.cpu.onnx``) gives it both without changing a single number:

* unsigned activations (its x86 kernels are U8S8): every activation Q/DQ pair becomes uint8 with zero
  point ``z + 128`` and the same scale. The grids are the same (s8 value ``v`` is u8 value
  ``v + 128``; rounding half to even commutes with adding an even integer).
* a QuantizeLinear right after the conv (it fuses ``DQ -> Conv -> Q`` into QLinearConv; ModelOpt
  quantizes only conv *inputs*, so ORT would run every conv in float on dequantized values). A
  Q/DQ pair is added after a conv only where that is exact: when every path from the conv output
  reaches quantizers of one and the same scale through Relu / MaxPool / Concat / reshapes, which
  commute with a monotone quantizer (clamp and round then Relu equals Relu then clamp and round).
  Convs feeding a residual Add or the float head outputs stay as they are.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from nasquant.errors import NasquantError
from nasquant.export.onnx import KEY_FLAVOR, load_onnx, save_onnx

UINT8_SHIFT = 128


def count_qdq(model: onnx.ModelProto) -> dict[str, int]:
    """Q/DQ node counts of the main graph.

    ``QuantizeLinear`` / ``DequantizeLinear``: node counts. ``weight_dq`` / ``activation_dq``: the
    DequantizeLinear nodes whose quantized input is a constant (directly, or through a QuantizeLinear
    of a constant) versus a runtime tensor.
    """
    graph = model.graph
    constants = _constant_names(graph)
    producers = {out: node for node in graph.node for out in node.output}
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
    model = copy.deepcopy(model)
    graph = model.graph
    values = _constant_values(graph)
    consumers = _consumers(graph)
    taken = set(values) | {out for node in graph.node for out in node.output}
    replaced: set[str] = set()
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
            replaced.add(quant_node.input[2])
            quant_node.input[2] = name
        retyped.add(node.output[0])
        for attribute in node.attribute:
            # opset 21 may also state the output type explicitly; it must agree with the zero point
            if attribute.name == "output_dtype":
                attribute.i = TensorProto.UINT8

    _remove_unused(graph, replaced)
    # A simplifier (onnxslim) records inferred types in value_info: the rewritten quantized
    # tensors are uint8 now, so their stale int8 entries must go before type checking.
    stale = [info for info in graph.value_info if info.name in retyped]
    for info in stale:
        graph.value_info.remove(info)
    onnx.checker.check_model(model, full_check=True)
    return model


def quantize_conv_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with a Q/DQ pair after every quantized conv where that changes no value.

    A conv qualifies when its data and weight inputs come from DequantizeLinear and every consumer
    path of its output ends, through grid-preserving ops only, in QuantizeLinear nodes that share
    one per-tensor scale and zero point; the new pair copies those.
    """
    model = copy.deepcopy(model)
    graph = model.graph
    values = _constant_values(graph)
    producers = {out: node for node in graph.node for out in node.output}
    consumers = _consumers(graph)
    taken = set(values) | set(producers)
    grids = _GridWalker(values, consumers, {out.name for out in graph.output})

    added: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type != "Conv" or not _dequantized_inputs(node, producers):
            continue
        users = consumers[node.output[0]]
        if users and all(user.op_type == "QuantizeLinear" for user in users):
            continue  # already DQ -> Conv -> Q
        found = grids.target(node.output[0])
        if found is None:
            continue
        scale, zero = (
            _unique_name(taken, f"{node.output[0]}_output_{part}") for part in ("scale", "zero_point")
        )
        graph.initializer.extend(
            [
                numpy_helper.from_array(values[found[0]], scale),
                numpy_helper.from_array(values[found[1]], zero),
            ]
        )
        quantized, dequantized = (
            _unique_name(taken, f"{node.output[0]}_{op}") for op in ("quantized", "dequantized")
        )
        prefix = node.name.rsplit("/", 1)[0] if node.name else node.output[0]
        for user in users:
            for index, name in enumerate(user.input):
                if name == node.output[0]:
                    user.input[index] = dequantized
        added[node.output[0]] = [
            onnx.helper.make_node(
                "QuantizeLinear",
                [node.output[0], scale, zero],
                [quantized],
                name=f"{prefix}/output_quantizer/QuantizeLinear",
            ),
            onnx.helper.make_node(
                "DequantizeLinear",
                [quantized, scale, zero],
                [dequantized],
                name=f"{prefix}/output_quantizer/DequantizeLinear",
            ),
        ]
    if added:
        # Keep the node list topologically sorted: each pair goes right after its conv.
        ordered = [new for node in graph.node for new in (node, *added.get(node.output[0], ()))]
        del graph.node[:]
        graph.node.extend(ordered)
    onnx.checker.check_model(model, full_check=True)
    return model


def to_cpu_flavor(model: onnx.ModelProto) -> onnx.ModelProto:
    """The ONNX Runtime CPU flavour of a ModelOpt INT8 graph: same numbers, integer kernels."""
    return to_uint8_activations(quantize_conv_outputs(model))


def write_cpu_flavor(trt_path: str | os.PathLike, cpu_path: str | os.PathLike) -> Path:
    """Derive the CPU flavour file from a TensorRT-flavour INT8 ONNX file (metadata kept, flavour set)."""
    cpu = to_cpu_flavor(load_onnx(trt_path))
    return save_onnx(cpu, cpu_path, metadata={KEY_FLAVOR: "cpu"})


#: ops that map quantizer-grid values to grid values and commute with a monotone quantizer
_GRID_PRESERVING = frozenset(
    {"Relu", "MaxPool", "Concat", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"}
)


class _GridWalker:
    """Finds the one quantizer grid (scale, zero point names) that every path from a tensor ends in."""

    def __init__(
        self, values: dict[str, np.ndarray], consumers: dict[str, list[onnx.NodeProto]], outputs: set[str]
    ) -> None:
        self.values, self.consumers, self.outputs = values, consumers, outputs
        self._memo: dict[str, tuple[str, str] | None] = {}

    def target(self, tensor: str) -> tuple[str, str] | None:
        if tensor not in self._memo:
            self._memo[tensor] = self._walk(tensor)
        return self._memo[tensor]

    def _walk(self, tensor: str) -> tuple[str, str] | None:
        users = self.consumers[tensor]
        if tensor in self.outputs or not users:
            return None
        grids: dict[tuple, tuple[str, str]] = {}
        for user in users:
            if user.op_type == "QuantizeLinear" and user.input[0] == tensor:
                found: tuple[str, str] | None = (user.input[1], user.input[2] if len(user.input) > 2 else "")
            elif self._passes(user, tensor):
                found = self.target(user.output[0])
            else:
                return None
            if found is None or not self._per_tensor(found):
                return None
            scale, zero = self.values[found[0]], self.values[found[1]]
            grids[(scale.dtype.str, scale.tobytes(), zero.dtype.str, zero.tobytes())] = found
        return next(iter(grids.values())) if len(grids) == 1 else None

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

    def _per_tensor(self, grid: tuple[str, str]) -> bool:
        scale, zero = self.values.get(grid[0]), self.values.get(grid[1])
        return scale is not None and zero is not None and scale.size == 1 and zero.size == 1


def _dequantized_inputs(conv: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> bool:
    sources = [producers.get(name) for name in conv.input[:2]]
    return all(source is not None and source.op_type == "DequantizeLinear" for source in sources)


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


def _remove_unused(graph: onnx.GraphProto, names: set[str]) -> None:
    """Drop the Constant nodes / initializers among ``names`` that nothing reads any more."""
    used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    dead = names - used
    kept_nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in dead)]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    kept_inits = [init for init in graph.initializer if init.name not in dead]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
