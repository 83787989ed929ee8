"""The ONNX graph toolkit the INT8 rewrites are built from: indexes (producers, consumers, constant
values), queries (Q/DQ counts, a quantizer's grid, the grid a tensor's readers end in) and in-place
edits (splice, rewire, prune). Plain functions over ``onnx.GraphProto``; nothing here knows a pass.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from nasquant.errors import NasquantError


def count_qdq(model: onnx.ModelProto) -> dict[str, int]:
    """Q/DQ node counts of the main graph.

    ``QuantizeLinear`` / ``DequantizeLinear``: node counts. ``weight_dq`` / ``activation_dq``: the
    DequantizeLinear nodes whose quantized input is a constant (directly, or through a QuantizeLinear
    of a constant) versus a runtime tensor.
    """
    graph = model.graph
    constants = constant_names(graph)
    producers = producer_index(graph)
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


def quantizer_axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def quantizer_grid(node: onnx.NodeProto, values: dict[str, np.ndarray]) -> tuple | None:
    """A per-tensor Q/DQ node's (scale, zero point) as a hashable value, or None if it is not one."""
    scale = values.get(node.input[1])
    zero = values.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scale is None or zero is None or scale.size != 1 or zero.size != 1:
        return None
    return (float(scale.astype(np.float32).reshape(())), zero.dtype.str, int(zero.reshape(())))


def same_grid(dequantize: onnx.NodeProto, quantize: onnx.NodeProto, values: dict[str, np.ndarray]) -> bool:
    grid = quantizer_grid(dequantize, values)
    return grid is not None and grid == quantizer_grid(quantize, values)


#: ops that map quantizer-grid values to grid values and commute with a monotone quantizer
GRID_PRESERVING = frozenset(
    {"Relu", "MaxPool", "Concat", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"}
)


#: ops that read only a tensor's shape, never its values
SHAPE_ONLY = frozenset({"Shape", "Size"})


class GridWalker:
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
        shape_readers = [user for user in users if user.op_type in SHAPE_ONLY]
        for user in users:
            if user.op_type in SHAPE_ONLY:
                continue
            if user.op_type == "QuantizeLinear" and user.input[0] == tensor:
                found: onnx.NodeProto | None = user
            elif self._passes(user, tensor):
                found = self.target(user.output[0])
            else:
                return None
            grid = None if found is None else quantizer_grid(found, self.values)
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
        grid_op = node.op_type in GRID_PRESERVING or (
            node.op_type == "Cast"
            and any(a.name == "to" and a.i == TensorProto.FLOAT for a in node.attribute)
        )
        # MaxPool's optional Indices output would expose positions, not values.
        extra_outputs_used = any(self.consumers[out] or out in self.outputs for out in node.output[1:])
        return grid_op and not extra_outputs_used


def producer_index(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def consumer_index(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    return consumers


def constant_names(graph: onnx.GraphProto) -> set[str]:
    names = {init.name for init in graph.initializer}
    names.update(node.output[0] for node in graph.node if node.op_type == "Constant")
    return names


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            # The exporter writes zero points and scales as tensor-valued Constant nodes.
            tensor = next((a.t for a in node.attribute if a.name == "value"), None)
            if tensor is not None:
                values[node.output[0]] = numpy_helper.to_array(tensor)
    return values


def quantizer_zero_point(node: onnx.NodeProto, values: dict[str, np.ndarray]) -> np.ndarray | None:
    if len(node.input) < 3 or not node.input[2]:
        return None
    if node.input[2] not in values:
        raise NasquantError(f"{node.name}: zero point {node.input[2]!r} is not a constant")
    return values[node.input[2]]


def unique_name(taken: set[str], stem: str) -> str:
    name, index = stem, 0
    while name in taken:
        index += 1
        name = f"{stem}_{index}"
    taken.add(name)
    return name


def splice(graph: onnx.GraphProto, replacements: dict[str, list[onnx.NodeProto]]) -> None:
    """Replace each node whose first output is a key by that key's node list, in place, keeping the
    node list topologically sorted (the lists include the node itself where it stays)."""
    if not replacements:
        return
    ordered = [new for node in graph.node for new in replacements.get(node.output[0], [node])]
    del graph.node[:]
    graph.node.extend(ordered)


def forget_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    """Drop recorded types/shapes of ``names``, made stale by a rewrite, before type checking."""
    stale = [info for info in graph.value_info if info.name in names]
    for info in stale:
        graph.value_info.remove(info)


def rewire(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Make every reader of tensor ``old`` read ``new`` instead."""
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new


def remove_dead_nodes(graph: onnx.GraphProto) -> None:
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


def rewritten(model: onnx.ModelProto, *passes: Callable[[onnx.ModelProto], None]) -> onnx.ModelProto:
    """A copy of ``model`` with the in-place ``passes`` applied in order, checked with full type inference."""
    model = copy.deepcopy(model)
    for rewrite in passes:
        rewrite(model)
    onnx.checker.check_model(model, full_check=True)
    return model
