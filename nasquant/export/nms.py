"""End-to-end graphs: NMS appended to an exported graph, so it ends in detections.

The tail is standard ONNX (TopK, ScatterElements, NonMaxSuppression, ScatterND, GatherElements), so
one file runs on ONNX Runtime, OpenVINO and TensorRT: TensorRT's ONNX parser turns
``NonMaxSuppression`` into its native NMS layer (``INMSLayer``, TensorRT 8.6+), with no plugin
library to ship, where the ``EfficientNMS_TRT`` plugin node would run on TensorRT alone. The outputs
follow EfficientNMS's convention all the same (:data:`~nasquant.artifacts.END_TO_END_OUTPUT_NAMES`).

It computes what :func:`nasquant.eval.postprocess.postprocess` computes: the ``top_k`` best (anchor,
class) pairs above ``conf`` (with ``multi_label`` false, only each anchor's best class), NMS within
each class at ``iou``, the ``max_det`` best survivors per image, best first. Ties between equal
scores may be broken in another order.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nasquant.artifacts import END_TO_END_OUTPUT_NAMES, KEY_NMS, OUTPUT_NAMES
from nasquant.errors import NasquantError
from nasquant.export.onnx_files import load_onnx, save_onnx, set_metadata
from nasquant.settings import NMSSettings

_PREFIX = "nms/"


def append_nms(model: onnx.ModelProto, settings: NMSSettings) -> onnx.ModelProto:
    """A copy of raw ``model`` (outputs ``boxes`` (N, A, 4), ``scores`` (N, A, C)) ending in
    ``num_dets`` (N, 1) int32, ``det_boxes`` (N, K, 4), ``det_scores`` (N, K), ``det_classes`` (N, K)
    int32 with K = ``settings.max_det``; rows past ``num_dets`` are zero. The settings are recorded
    under :data:`~nasquant.artifacts.KEY_NMS`."""
    if settings.agnostic:
        raise NasquantError(
            "end-to-end graphs apply NMS within each class; class-agnostic NMS is only available in "
            "nasquant's own post-processing (NAS.predict(agnostic=True))"
        )
    outputs = {value.name: value for value in model.graph.output}
    if set(outputs) != set(OUTPUT_NAMES):
        raise NasquantError(
            f"NMS is appended to a raw graph with outputs {', '.join(OUTPUT_NAMES)}, "
            f"this one has {', '.join(outputs)}"
        )
    anchors, classes = _static_dims(model)
    pairs = anchors * classes
    top_k, max_det = min(settings.top_k, pairs), min(settings.max_det, pairs)

    end_to_end = onnx.ModelProto()
    end_to_end.CopyFrom(model)
    graph = end_to_end.graph
    constants = {
        "flat_shape": np.array([0, pairs], np.int64),
        "pair_shape": np.array([0, anchors, classes], np.int64),
        "top_k": np.array([top_k], np.int64),
        "max_det": np.array([max_det], np.int64),
        "max_per_class": np.array([max_det], np.int64),
        "iou": np.array([settings.iou], np.float32),
        "conf": np.array([settings.conf], np.float32),
        "anchors": np.array(anchors, np.int64),
        "last_axis": np.array([-1], np.int64),
        "box_sides": np.array([1, 1, 4], np.int64),
        "zero_int": np.array(0, np.int32),
        "zero_float": np.array(0, np.float32),
        "one": np.array([1], np.int64),
    }
    graph.initializer.extend(
        numpy_helper.from_array(value, _PREFIX + name) for name, value in constants.items()
    )

    def node(op: str, inputs: list[str], outputs: list[str] | None = None, **attributes) -> str:
        """Add ``op`` named after its first output; an input is a tensor, or one of ``constants``."""
        names = [_PREFIX + name if name in constants else name for name in inputs]
        outs = outputs or [_PREFIX + f"{op}_{len(graph.node)}"]
        graph.node.append(helper.make_node(op, names, outs, name=outs[0], **attributes))
        return outs[0]

    scores = "scores"
    if not settings.multi_label:
        # 0. One class per anchor: every score but the anchor's best is zeroed, so the pairs below are
        #    postprocess's single-label candidates (TopK, not ReduceMax, whose axes moved in opset 18).
        anchor_best = _PREFIX + "anchor_best"
        node("TopK", ["scores", "one"], [anchor_best, _PREFIX + "anchor_best_index"], axis=-1)
        scores = node("Where", [node("Equal", ["scores", anchor_best]), "scores", "zero_float"])
    # 1. The top_k best (anchor, class) pairs; the rest are zeroed. TopK puts the lower index first
    #    among equal scores: the (anchor, class) order postprocess's candidate sort keeps.
    flat = node("Reshape", [scores, "flat_shape"])
    best, best_index = (_PREFIX + name for name in ("best", "best_index"))
    node("TopK", [flat, "top_k"], [best, best_index], axis=-1, largest=1, sorted=1)
    zeros = node("Mul", [flat, "zero_float"])
    candidates = node("ScatterElements", [zeros, best_index, best], axis=1)
    # 2. NMS within each class over scores (N, C, A); pairs at or below conf never count.
    by_class = node("Transpose", [node("Reshape", [candidates, "pair_shape"])], perm=[0, 2, 1])
    selected = node(
        "NonMaxSuppression", ["boxes", by_class, "max_per_class", "iou", "conf"], center_point_box=0
    )
    # 3. The survivors' scores scattered back into (N, C*A), so one TopK per image ranks them across
    #    classes; a zero score marks a padding row.
    kept = node(
        "ScatterND", [node("Mul", [by_class, "zero_float"]), selected, node("GatherND", [by_class, selected])]
    )
    kept_flat = node("Reshape", [kept, "flat_shape"])
    scores_out, index = END_TO_END_OUTPUT_NAMES[2], _PREFIX + "det_index"
    node("TopK", [kept_flat, "max_det"], [scores_out, index], axis=-1, largest=1, sorted=1)
    valid = node("Greater", [scores_out, "zero_float"])
    node(
        "ReduceSum",
        [node("Cast", [valid], to=TensorProto.INT32), "last_axis"],
        [END_TO_END_OUTPUT_NAMES[0]],
        keepdims=1,
    )
    class_ids = node("Cast", [node("Div", [index, "anchors"])], to=TensorProto.INT32)
    node("Where", [valid, class_ids, "zero_int"], [END_TO_END_OUTPUT_NAMES[3]])
    anchor = node("Unsqueeze", [node("Mod", [index, "anchors"]), "last_axis"])
    gathered = node("GatherElements", ["boxes", node("Tile", [anchor, "box_sides"])], axis=1)
    node(
        "Where",
        [node("Unsqueeze", [valid, "last_axis"]), gathered, "zero_float"],
        [END_TO_END_OUTPUT_NAMES[1]],
    )

    batch = outputs["boxes"].type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_param or batch.dim_value
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(END_TO_END_OUTPUT_NAMES[0], TensorProto.INT32, [batch_dim, 1]),
            helper.make_tensor_value_info(
                END_TO_END_OUTPUT_NAMES[1], TensorProto.FLOAT, [batch_dim, max_det, 4]
            ),
            helper.make_tensor_value_info(
                END_TO_END_OUTPUT_NAMES[2], TensorProto.FLOAT, [batch_dim, max_det]
            ),
            helper.make_tensor_value_info(
                END_TO_END_OUTPUT_NAMES[3], TensorProto.INT32, [batch_dim, max_det]
            ),
        ]
    )
    set_metadata(end_to_end, {KEY_NMS: json.dumps(asdict(settings))})
    return end_to_end


def _static_dims(model: onnx.ModelProto) -> tuple[int, int]:
    """(anchors, classes) of the ``scores`` output: static for a fixed input size, which TopK's K and
    the reshapes need (TensorRT takes only a constant K). A dynamic-batch export names every output
    dimension symbolically, so they come from shape inference then."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    scores = next(value for value in inferred.graph.output if value.name == OUTPUT_NAMES[1])
    values = [
        dim.dim_value if dim.HasField("dim_value") else None for dim in scores.type.tensor_type.shape.dim
    ]
    if len(values) != 3 or values[1] is None or values[2] is None:
        raise NasquantError(f"NMS needs a scores output of static shape (N, A, C), found {values}")
    return values[1], values[2]


def write_end_to_end(raw_path: str | os.PathLike, target: str | os.PathLike, settings: NMSSettings) -> Path:
    """Write the end-to-end copy of the raw graph file ``raw_path`` (metadata kept) to ``target``."""
    return save_onnx(append_nms(load_onnx(raw_path), settings), target)
