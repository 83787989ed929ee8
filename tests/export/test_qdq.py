"""INT8 export from one ModelOpt calibration: the TensorRT flavour as ModelOpt emits it, and the exact,
integer-kernel CPU flavour derived from it."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from nasquant import NAS
from nasquant.artifacts import KEY_FLAVOR, KEY_PRECISION, read_metadata
from nasquant.data.preprocess import preprocess, read_image
from nasquant.errors import NasquantError
from nasquant.eval.postprocess import Detections, postprocess
from nasquant.export import (
    count_qdq,
    drop_requantization,
    export_onnx,
    fold_scalar_multipliers,
    quantize_outputs,
    space_to_depth_input_convs,
    to_uint8_activations,
    undo_space_to_depth_input_convs,
    unsigned_grids_for_nonnegative,
    write_cpu_flavor,
)
from nasquant.models.layers import HALF_FACTORS_ATTRIBUTE
from nasquant.quant import keep_in_float
from nasquant.runtime import OnnxRuntimeBackend, optimized_op_types
from tests.conftest import IMGSZ
from tests.crafted import onnx_model
from tests.shared import shared_path

# YOLO-NAS-S: 98 convs + 2 transposed convs (weights and inputs) + 3 SPP max-pools (inputs)
# + 20 bottlenecks (both residual Add operands)
WEIGHT_QDQ, ACTIVATION_QDQ = 100, 103 + 2 * 20


@pytest.fixture(scope="module")
def images(shapes_nas: NAS) -> np.ndarray:
    paths = sorted(shared_path("data", "shapes", "val", "images").glob("*.jpg"))[:4]
    return np.stack([preprocess(read_image(p), shapes_nas.preprocessing())[0] for p in paths])


def _qdq_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


def _values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _is_weight(node: onnx.NodeProto, model: onnx.ModelProto) -> bool:
    initializers = {init.name for init in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    if node.op_type == "DequantizeLinear" and node.input[0] in producers:
        node = producers[node.input[0]]  # its QuantizeLinear: of a float weight, or of an activation
    return node.input[0] in initializers  # a float weight, or an int8 one stored as such


def test_every_graph_has_the_lowest_ir_version_its_opsets_allow(
    flavors: dict[str, Path], fp32_onnx: Path
) -> None:
    # A newer IR than needed is refused by older readers (ONNX Runtime 1.30 reads IR 13 at most;
    # TensorRT's parser lags further): the graphs carry what their opsets require, as torch writes it.
    for path in (fp32_onnx, *flavors.values()):
        model = onnx.load(str(path), load_external_data=False)
        assert model.ir_version == helper.find_min_ir_version_for(list(model.opset_import)), path.name


def test_tensorrt_flavor_is_modelopts_signed_qdq(flavors: dict[str, Path]) -> None:
    model = onnx.load(str(flavors["trt"]))
    # Weights are int8 initializers read by their DequantizeLinear: no QuantizeLinear of their own.
    assert count_qdq(model) == {
        "QuantizeLinear": ACTIVATION_QDQ,
        "DequantizeLinear": WEIGHT_QDQ + ACTIVATION_QDQ,
        "weight_dq": WEIGHT_QDQ,
        "activation_dq": ACTIVATION_QDQ,
    }
    values = _values(model)
    assert all(
        values[n.input[2]].dtype == np.int8 and not values[n.input[2]].any() for n in _qdq_nodes(model)
    )
    assert read_metadata(flavors["trt"])[KEY_PRECISION] == "int8"


def test_int8_weight_storage_is_bit_identical_and_a_quarter_of_the_bytes(
    calibrated: torch.nn.Module, flavors: dict[str, Path], fp32_onnx: Path, tmp_path: Path
) -> None:
    floating = export_onnx(
        calibrated, tmp_path / "float.trt.onnx", imgsz=IMGSZ, dynamic_batch=True, int8_weights=False
    )
    float_flavors = {"trt": floating, "cpu": write_cpu_flavor(floating, tmp_path / "float.cpu.onnx")}
    assert count_qdq(onnx.load(str(floating)))["QuantizeLinear"] == WEIGHT_QDQ + ACTIVATION_QDQ
    images = np.random.default_rng(2).random((2, 3, IMGSZ, IMGSZ), dtype=np.float32)
    for flavor, stored in flavors.items():
        weights = [i for i in onnx.load(str(stored)).graph.initializer if i.name.endswith(".weight")]
        assert weights and all(w.data_type == TensorProto.INT8 for w in weights), flavor
        # every quantized layer here (all-layers INT8): int8 weights are most of the file
        assert stored.stat().st_size <= 0.30 * fp32_onnx.stat().st_size, flavor
        for level in ("all", "disable"):  # fused integer kernels, and the plain Q/DQ reference
            got = OnnxRuntimeBackend(stored, optimization_level=level).run(images)
            want = OnnxRuntimeBackend(float_flavors[flavor], optimization_level=level).run(images)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


def _float_conv_weights(model: onnx.ModelProto) -> list[str]:
    initializers = {i.name for i in model.graph.initializer}
    return [n.input[1] for n in model.graph.node if n.op_type == "Conv" and n.input[1] in initializers]


def _without_half_factors(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose folded convs forget their weights before folding, as if the checkpoint were float32."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if hasattr(module, HALF_FACTORS_ATTRIBUTE):
            delattr(module, HALF_FACTORS_ATTRIBUTE)
    return copied


def test_float_layers_of_an_int8_graph_store_half_precision_weights(
    calibrated: torch.nn.Module, tmp_path: Path
) -> None:
    selective, kept = keep_in_float(calibrated, ["heads.head*.reg_convs.*", "heads.head*.reg_pred"])
    images = np.random.default_rng(3).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    graphs = {}
    for name, model, storage in (
        ("float32", selective, "float32"),
        ("float16", selective, "float16"),
        ("rounded", _without_half_factors(selective), "float16"),
    ):
        trt = export_onnx(model, tmp_path / f"{name}.trt.onnx", imgsz=IMGSZ, float_weights=storage)
        graphs[name] = {"trt": trt, "cpu": write_cpu_flavor(trt, tmp_path / f"{name}.cpu.onnx")}
    for flavor in ("trt", "cpu"):
        full, half, rounded = (onnx.load(str(graphs[n][flavor])) for n in ("float32", "float16", "rounded"))
        weights = _float_conv_weights(full)
        assert len(weights) == len(kept) == 6, flavor  # 3 heads x (tower conv, reg_pred)
        weight_bytes = sum(
            numpy_helper.to_array(i).nbytes for i in full.graph.initializer if i.name in weights
        )
        for graph in (half, rounded):
            # each float conv reads a float16 initializer through a Cast (and, for a folded one
            # rebuilt exactly, a per-channel Mul); the quantized layers are untouched
            assert not _float_conv_weights(graph)
            halves = [i for i in graph.graph.initializer if i.data_type == TensorProto.FLOAT16]
            assert sorted(i.name for i in halves) == sorted(f"{w}_float16" for w in weights)
            assert count_qdq(graph) == count_qdq(full)
        for name in ("float16", "rounded"):
            saved = graphs["float32"][flavor].stat().st_size - graphs[name][flavor].stat().st_size
            assert abs(saved - weight_bytes / 2) < 0.01 * weight_bytes, (flavor, name)
        # The fixture is a half-precision checkpoint: its reg_pred weights are exact in float16 and its
        # folded tower convs rebuild exactly from the float16 weights before folding.
        assert sum(n.op_type == "Mul" and n.name.endswith("/rebuild") for n in half.graph.node) == 3
        want = OnnxRuntimeBackend(graphs["float32"][flavor]).run(images)
        got = OnnxRuntimeBackend(graphs["float16"][flavor]).run(images)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        # Without those factors the folded weights are rounded to 11 significant bits: the outputs move,
        # far less than the INT8 grid does.
        assert not any(n.name.endswith("/rebuild") for n in rounded.graph.node)
        got = OnnxRuntimeBackend(graphs["rounded"][flavor]).run(images)
        int8_scale = np.abs(want[0]).max() / 127
        assert 0 < np.abs(got[0] - want[0]).max() < int8_scale, flavor
        np.testing.assert_allclose(got[1], want[1], atol=1e-3)


def test_to_uint8_activations_shifts_only_activation_zero_points(flavors: dict[str, Path]) -> None:
    signed = onnx.load(str(flavors["trt"]))
    original = signed.SerializeToString()
    unsigned = to_uint8_activations(signed)
    assert signed.SerializeToString() == original  # the input model is not modified
    assert count_qdq(unsigned) == count_qdq(signed)
    old, new = _values(signed), _values(unsigned)
    old_nodes = {n.name: n for n in _qdq_nodes(signed)}
    for node in _qdq_nodes(unsigned):
        zero = new[node.input[2]]
        if _is_weight(node, unsigned):
            assert zero.dtype == np.int8 and not zero.any()
        else:
            assert zero.dtype == np.uint8 and zero.shape == () and int(zero) == 128
        np.testing.assert_array_equal(new[node.input[1]], old[old_nodes[node.name].input[1]])  # same scale
    # Already unsigned: a second pass changes nothing.
    assert to_uint8_activations(unsigned).SerializeToString() == unsigned.SerializeToString()


def test_the_exact_cpu_flavor_steps_compute_what_the_tensorrt_flavor_computes(
    flavors: dict[str, Path], images: np.ndarray, tmp_path: Path
) -> None:
    # Output quantizers where exact, requantization dropped, unsigned grids: bit-identical results.
    # With ORT's graph rewrites off, each graph runs as written: the reference semantics.
    exact = to_uint8_activations(drop_requantization(quantize_outputs(onnx.load(str(flavors["trt"])))))
    onnx.save(exact, str(tmp_path / "exact.onnx"))
    trt = OnnxRuntimeBackend(flavors["trt"], optimization_level="disable").run(images)
    got = OnnxRuntimeBackend(tmp_path / "exact.onnx", optimization_level="disable").run(images)
    np.testing.assert_array_equal(got[0], trt[0])
    np.testing.assert_array_equal(got[1], trt[1])


def test_cpu_flavor_runs_integer_kernels_only(flavors: dict[str, Path]) -> None:
    assert read_metadata(flavors["cpu"])[KEY_FLAVOR] == "cpu"
    assert read_metadata(flavors["cpu"])[KEY_PRECISION] == "int8"
    ops = optimized_op_types(flavors["cpu"])
    # Every one of S's 98 convs but the six prediction convs (float outputs) runs as QLinearConv, plus
    # a copy of the neck's lateral conv, whose output two stages read on different grids (93 here).
    # Residual Adds are QLinearAdd; no Relu is left (folded into quantizers).
    assert ops["QLinearConv"] >= 91
    assert ops["QLinearAdd"] >= 18
    assert ops["QLinearConcat"] >= 8
    assert ops.get("Relu", 0) == 0
    # The neck's two upsampling ConvTransposes stay float (ORT has no integer one on CPU).
    assert ops["ConvTranspose"] == 2 and ops.get("DepthToSpace", 0) == 0
    # The RGB stem reads its input space-to-depth (a 12-channel stride-1 conv).
    assert ops["SpaceToDepth"] == 1
    # ModelOpt's graph as is (inputs quantized, outputs not) gives ORT nothing to fuse: float convs.
    assert optimized_op_types(flavors["trt"])["QLinearConv"] == 0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = float(np.prod(np.clip(rb - lt, 0, None)))
    union = float(np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2])) - inter
    return inter / union


def _covered(confident: Detections, other: Detections) -> bool:
    """Every confident detection has a same-class twin (IoU >= 0.9, score within 0.1) in ``other``."""
    for box, score, cls in zip(confident.boxes, confident.scores, confident.class_ids, strict=True):
        twins = [
            i
            for i in range(len(other))
            if other.class_ids[i] == cls
            and _iou(box, other.boxes[i]) >= 0.9
            and abs(other.scores[i] - score) <= 0.1
        ]
        if not twins:
            return False
    return True


def test_flavors_give_the_same_detections_with_all_optimizations(
    flavors: dict[str, Path], images: np.ndarray
) -> None:
    # Now the CPU flavour runs integer kernels and the TensorRT one float math on the same grid:
    # they differ by requantization rounding only.
    trt = OnnxRuntimeBackend(flavors["trt"], threads=2).run(images)
    cpu = OnnxRuntimeBackend(flavors["cpu"], threads=2).run(images)
    assert np.abs(cpu[1] - trt[1]).max() < 0.15
    for trt_dets, cpu_dets in zip(postprocess(*trt, conf=0.25), postprocess(*cpu, conf=0.25), strict=True):
        assert len(trt_dets) > 0
        assert _covered(_confident(trt_dets), cpu_dets) and _covered(_confident(cpu_dets), trt_dets)


def _confident(detections: Detections, threshold: float = 0.5) -> Detections:
    keep = detections.scores >= threshold
    return Detections(detections.boxes[keep], detections.scores[keep], detections.class_ids[keep])


def test_simplify_keeps_every_qdq_node(
    calibrated: torch.nn.Module, flavors: dict[str, Path], tmp_path: Path
) -> None:
    slim = export_onnx(calibrated, tmp_path / "slim.onnx", imgsz=IMGSZ, dynamic_batch=True, simplify=True)
    assert count_qdq(onnx.load(str(slim))) == count_qdq(onnx.load(str(flavors["trt"])))
    images = np.random.default_rng(0).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    plain = OnnxRuntimeBackend(flavors["trt"], optimization_level="disable").run(images)
    slimmed = OnnxRuntimeBackend(slim, optimization_level="disable").run(images)
    np.testing.assert_array_equal(plain[1], slimmed[1])


def test_cpu_flavor_of_a_simplified_selective_graph(calibrated: torch.nn.Module, tmp_path: Path) -> None:
    # Regression: onnxslim records int8 types in value_info; the uint8 rewrite must not trip on them.
    selective, _ = keep_in_float(calibrated, ["backbone.stem.*"])
    trt = export_onnx(selective, tmp_path / "sel.trt.onnx", imgsz=IMGSZ, simplify=True)
    cpu = write_cpu_flavor(trt, tmp_path / "sel.cpu.onnx")
    images = np.random.default_rng(1).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    signed = OnnxRuntimeBackend(trt, optimization_level="disable").run(images)
    unsigned = OnnxRuntimeBackend(cpu, optimization_level="disable").run(images)
    assert np.abs(signed[1] - unsigned[1]).max() < 0.15


def test_a_simplified_int8_graph_shares_no_weight_quantization_parameters(
    calibrated: torch.nn.Module, tmp_path: Path
) -> None:
    # onnxslim's weight tying merges the all-zero weight zero points of every conv with the same
    # channel count, the ConvTransposes' (axis 1) with the convs' (axis 0): OpenVINO then ran 37
    # quantized convs in f32 (tests/runtime/test_openvino_backend.py checks the kernels). The export
    # gives each weight DequantizeLinear its own again.
    selective, _ = keep_in_float(calibrated, ["heads.head*.reg_convs.*", "heads.head*.reg_pred"])
    trt = export_onnx(selective, tmp_path / "sel.trt.onnx", imgsz=IMGSZ, simplify=True)
    for path in (trt, write_cpu_flavor(trt, tmp_path / "sel.cpu.onnx")):
        model = onnx.load(str(path))
        initializers = {i.name for i in model.graph.initializer}
        readers: dict[str, int] = {}
        for node in model.graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] in initializers:  # a weight's
                for name in node.input[1:]:
                    readers[name] = readers.get(name, 0) + 1
        assert len(readers) > 2 * WEIGHT_QDQ * 0.9 and max(readers.values()) == 1, path.name
        # Tied again (equal zero points shared, as weight tying left them): the same outputs on ORT.
        values = {i.name: i.raw_data for i in model.graph.initializer}
        first: dict[bytes, str] = {}
        for node in model.graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
                node.input[2] = first.setdefault(values[node.input[2]], node.input[2])
        tied = tmp_path / f"tied.{path.name}"
        onnx.save(model, str(tied))
        images = np.random.default_rng(4).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
        for got, want in zip(
            OnnxRuntimeBackend(path).run(images), OnnxRuntimeBackend(tied).run(images), strict=True
        ):
            np.testing.assert_array_equal(got, want)


# Small hand-built graphs pin down when a conv output may be quantized.


def _qdq_conv_graph(tail: str, scales: tuple[float, float] = (0.1, 0.1)) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv -> Relu, then two quantizers with ``scales`` (``tail="quant"``) or a residual
    Add with the float input (``tail="residual"``)."""
    inits = [
        numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w"),
        numpy_helper.from_array(np.array(0.1, np.float32), "s_in"),
        numpy_helper.from_array(np.array(0, np.int8), "z_in"),
        numpy_helper.from_array(np.full(2, 0.01, np.float32), "s_w"),
        numpy_helper.from_array(np.zeros(2, np.int8), "z_w"),
        numpy_helper.from_array(np.array(scales[0], np.float32), "s_a"),
        numpy_helper.from_array(np.array(scales[1], np.float32), "s_b"),
        numpy_helper.from_array(np.array(0, np.int8), "z_a"),
        numpy_helper.from_array(np.array(0, np.int8), "z_b"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s_in", "z_in"], ["xq"], name="in_q"),
        helper.make_node("DequantizeLinear", ["xq", "s_in", "z_in"], ["xd"], name="in_dq"),
        helper.make_node("QuantizeLinear", ["w", "s_w", "z_w"], ["wq"], name="w_q", axis=0),
        helper.make_node("DequantizeLinear", ["wq", "s_w", "z_w"], ["wd"], name="w_dq", axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
    ]
    if tail == "residual":
        nodes.append(helper.make_node("Add", ["r", "x"], ["y"], name="add"))
    else:
        for branch, scale in (("a", "s_a"), ("b", "s_b")):
            zero = f"z_{branch}"
            nodes += [
                helper.make_node("QuantizeLinear", ["r", scale, zero], [f"q{branch}"], name=f"q_{branch}"),
                helper.make_node(
                    "DequantizeLinear", [f"q{branch}", scale, zero], [f"d{branch}"], name=f"dq_{branch}"
                ),
            ]
        nodes.append(helper.make_node("Add", ["da", "db"], ["y"], name="add"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        inits,
    )
    return onnx_model(graph)


@pytest.mark.parametrize(
    ("tail", "scales", "added", "convs"),
    [
        ("quant", (0.1, 0.1), 1, 1),  # one grid: one pair after the Relu
        ("residual", (0.1, 0.1), 0, 1),  # a float reader: nothing to do exactly
        ("quant", (0.1, 0.2), 2, 2),  # two grids: one conv copy and pair per grid
    ],
)
def test_conv_outputs_are_quantized_only_where_exact(
    tail: str, scales: tuple[float, float], added: int, convs: int
) -> None:
    model = _qdq_conv_graph(tail, scales)
    quantized = quantize_outputs(model)
    assert count_qdq(quantized)["QuantizeLinear"] - count_qdq(model)["QuantizeLinear"] == added
    assert _ops(quantized).count("Conv") == convs
    x = np.random.default_rng(0).normal(0, 3, (1, 2, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run(quantized, x), _run(model, x))


def test_uint8_rewrite_refuses_a_quantized_tensor_it_cannot_follow() -> None:
    model = _qdq_conv_graph("quant")
    # Feed the activation quantizer's int8 output straight into a Cast: no DQ to rewrite with it.
    model.graph.node.append(helper.make_node("Cast", ["qa"], ["odd"], name="cast", to=TensorProto.INT32))
    with pytest.raises(NasquantError, match="feeds Cast, not DequantizeLinear"):
        to_uint8_activations(model)


def _chain(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        inits,
    )
    return onnx_model(graph)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _scalar(name: str, value: float, dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype), name)


X = np.array([[-3.0, 0.26, 5.0, 12.0]], np.float32)


@pytest.mark.parametrize(("alpha", "folded"), [(0.5, True), (-0.5, False)])
def test_a_positive_scalar_multiplier_folds_into_the_dequantize_scale(alpha: float, folded: bool) -> None:
    model = _chain(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
            helper.make_node("Mul", ["alpha", "d"], ["y"]),
        ],
        [
            _scalar("s", 0.1),
            _scalar("z", 0, np.int8),
            numpy_helper.from_array(np.array([alpha], np.float32), "alpha"),
        ],
    )
    result = fold_scalar_multipliers(model)
    assert ("Mul" not in _ops(result)) is folded
    np.testing.assert_allclose(_run(result, X), _run(model, X), rtol=1e-6)


def test_requantization_on_the_same_grid_is_dropped_and_twin_quantizers_merge() -> None:
    model = _chain(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q0"]),
            helper.make_node("DequantizeLinear", ["q0", "s", "z"], ["d0"]),
            # the same grid again (another quantizer's copy of the constants): a no-op
            helper.make_node("QuantizeLinear", ["d0", "s2", "z2"], ["q1"]),
            helper.make_node("DequantizeLinear", ["q1", "s2", "z2"], ["d1"]),
            # two quantizers of one tensor on one grid, and one on another grid
            helper.make_node("QuantizeLinear", ["x", "s2", "z2"], ["q2"]),
            helper.make_node("DequantizeLinear", ["q2", "s2", "z2"], ["d2"]),
            helper.make_node("QuantizeLinear", ["x", "s3", "z2"], ["q3"]),
            helper.make_node("DequantizeLinear", ["q3", "s3", "z2"], ["d3"]),
            helper.make_node("Sum", ["d1", "d2", "d3"], ["y"]),
        ],
        [
            _scalar("s", 0.1),
            _scalar("z", 0, np.int8),
            _scalar("s2", 0.1),
            _scalar("z2", 0, np.int8),
            _scalar("s3", 0.2),
        ],
    )
    result = drop_requantization(model)
    assert _ops(result).count("QuantizeLinear") == 2  # one per grid
    np.testing.assert_array_equal(_run(result, X), _run(model, X))


def test_a_relu_and_its_quantizer_become_one_unsigned_quantizer_twice_as_fine() -> None:
    model = _chain(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        [_scalar("s", 0.1), _scalar("z", 128, np.uint8)],  # the signed grid of amax 12.7, shifted
    )
    result = unsigned_grids_for_nonnegative(model)
    assert _ops(result) == ["QuantizeLinear", "DequantizeLinear"]
    x = np.linspace(-3.0, 20.0, 460, dtype=np.float32).reshape(-1, 1, 4)
    signed = np.concatenate([_run(model, row) for row in x])
    unsigned = np.concatenate([_run(result, row) for row in x])
    values = x.reshape(signed.shape)
    inside = (values >= 0) & (values <= 12.7)
    # The same range: 0 below it, the same clipping point above it ...
    np.testing.assert_array_equal(unsigned[values < 0], 0)
    np.testing.assert_allclose(unsigned[values > 12.75], 12.7, rtol=1e-6)
    np.testing.assert_allclose(signed[values > 12.75], 12.7, rtol=1e-6)
    # ... in steps of 12.7 / 255 instead of 12.7 / 127.
    step = 12.7 / 255
    assert np.abs(unsigned - values)[inside].max() <= step / 2 + 1e-6
    assert np.abs(signed - values)[inside].max() > step / 2 + 1e-6
    assert len(np.unique(unsigned[inside])) > 1.9 * len(np.unique(signed[inside]))


def test_only_tensors_that_cannot_be_negative_take_an_unsigned_grid() -> None:
    def pair(source: str, name: str) -> list[onnx.NodeProto]:
        return [
            helper.make_node("QuantizeLinear", [source, "s", "z"], [f"{name}_q"], name=f"{name}/Q"),
            helper.make_node("DequantizeLinear", [f"{name}_q", "s", "z"], [f"{name}_d"], name=f"{name}/DQ"),
        ]

    # x may be negative; relu(x), maxima and sums of non-negative tensors may not; x + relu(x) may.
    model = _chain(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Abs", ["x"], ["a"]),
            *pair("r", "relu"),
            *pair("x", "raw"),
            helper.make_node("Max", ["relu_d", "a"], ["m"]),
            *pair("m", "max"),
            helper.make_node("Add", ["x", "relu_d"], ["mixed"]),
            *pair("mixed", "mixed"),
            helper.make_node("Sum", ["max_d", "mixed_d", "raw_d"], ["y"]),
        ],
        [_scalar("s", 0.1), _scalar("z", 128, np.uint8)],
    )
    result = unsigned_grids_for_nonnegative(model)
    values = {init.name: numpy_helper.to_array(init) for init in result.graph.initializer}
    zero_points = {
        n.name: int(values[n.input[2]]) for n in result.graph.node if n.op_type == "QuantizeLinear"
    }
    assert zero_points == {"relu/Q": 0, "raw/Q": 128, "max/Q": 0, "mixed/Q": 128}
    assert "Relu" not in _ops(result)
    x = np.array([[-3.0, 0.26, 5.0, 12.0]], np.float32)
    # three quantizers summed, each within half a signed (0.05) plus half an unsigned step of the other
    np.testing.assert_allclose(_run(result, x), _run(model, x), atol=3 * (0.05 + 0.025) + 1e-6)


def _strided_conv_graph(
    kernel: int, stride: int, pads: list[int], size: int, cin: int = 3
) -> onnx.ModelProto:
    """x -> Q/DQ (uint8) -> Conv(per-output-channel int8 weights, bias) -> y, like the CPU flavour's stem."""
    rng = np.random.default_rng(0)
    cout = 5
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (cout, cin, kernel, kernel)).astype(np.float32), "w"),
        numpy_helper.from_array(np.linspace(0.01, 0.05, cout).astype(np.float32), "s_w"),
        numpy_helper.from_array(np.zeros(cout, np.int8), "z_w"),
        numpy_helper.from_array(rng.normal(0, 1, cout).astype(np.float32), "b"),
        _scalar("s_x", 1 / 127),
        _scalar("z_x", 128, np.uint8),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s_x", "z_x"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s_x", "z_x"], ["xd"]),
        helper.make_node("QuantizeLinear", ["w", "s_w", "z_w"], ["wq"], axis=0),
        helper.make_node("DequantizeLinear", ["wq", "s_w", "z_w"], ["wd"], axis=0),
        helper.make_node(
            "Conv", ["xd", "wd", "b"], ["y"], kernel_shape=[kernel] * 2, strides=[stride] * 2, pads=pads
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, None, None])],
        inits,
    )
    return onnx_model(graph)


@pytest.mark.parametrize(
    ("kernel", "stride", "pads", "size", "cin", "rewritten"),
    [
        (3, 2, [1, 1, 1, 1], 16, 3, True),  # YOLO-NAS's stem
        (4, 2, [1, 1, 1, 1], 16, 3, True),
        (3, 2, [0, 0, 0, 0], 16, 3, True),
        (6, 3, [2, 1, 2, 1], 18, 3, True),
        (3, 2, [1, 1, 1, 1], 15, 3, False),  # SpaceToDepth needs sides the stride divides
        (3, 1, [1, 1, 1, 1], 16, 3, False),  # nothing to gain at stride 1
        (3, 2, [1, 1, 1, 1], 16, 8, False),  # enough channels for the integer kernel already
    ],
)
def test_a_strided_conv_on_few_channels_reads_its_input_space_to_depth(
    kernel: int, stride: int, pads: list[int], size: int, cin: int, rewritten: bool
) -> None:
    model = _strided_conv_graph(kernel, stride, pads, size, cin)
    result = space_to_depth_input_convs(model)
    assert ("SpaceToDepth" in _ops(result)) is rewritten
    x = np.random.default_rng(1).random((1, cin, size, size), dtype=np.float32)
    got, want = _run(result, x), _run(model, x)
    assert got.shape == want.shape
    # Without an output quantizer ORT runs this conv in float32 on the dequantized values, and the
    # rewritten graph sums the same products in another order (the order depends on the CPU's conv
    # kernel): equal up to one rounding per term, not bit for bit. In the CPU flavour the stem has its
    # output Q/DQ, so ORT runs it as an integer QLinearConv, where the sums are exact.
    terms = cin * kernel * kernel
    np.testing.assert_allclose(got, want, rtol=0, atol=terms * np.finfo(np.float32).eps * np.abs(want).max())


@pytest.mark.parametrize(
    ("kernel", "stride", "pads"),
    [((3, 2, [1, 1, 1, 1])), (4, 2, [1, 1, 1, 1]), (3, 2, [0, 0, 0, 0]), (6, 3, [2, 1, 2, 1])],
)
def test_a_space_to_depth_conv_is_the_strided_conv_again_for_openvino(
    kernel: int, stride: int, pads: list[int]
) -> None:
    size = 18 if stride == 3 else 16
    model = _strided_conv_graph(kernel, stride, pads, size)
    blocks = space_to_depth_input_convs(model)
    undone = undo_space_to_depth_input_convs(blocks)
    assert "SpaceToDepth" in _ops(blocks) and "SpaceToDepth" not in _ops(undone)
    assert _ops(undone) == _ops(model)
    conv = next(n for n in undone.graph.node if n.op_type == "Conv")
    attributes = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attributes["strides"] == [stride, stride]
    x = np.random.default_rng(1).random((1, 3, size, size), dtype=np.float32)
    want = _run(model, x)
    if kernel == 3 and pads in ([1, 1, 1, 1], [0, 0, 0, 0]):
        # YOLO-NAS's stem: the rearrangement's zero taps trim away, back to the same kernel (an end
        # pad no output reads may be gone: the same conv)
        assert attributes["kernel_shape"] == [3, 3] and attributes["pads"][:2] == pads[:2]
        np.testing.assert_array_equal(_values(undone)["w_space_to_depth_strided"], _values(model)["w"])
        np.testing.assert_array_equal(_run(undone, x), want)
    else:  # a zero tap may stay where a pad cannot absorb it: the same sums, in another order
        terms = 3 * kernel * kernel
        atol = terms * np.finfo(np.float32).eps * np.abs(want).max()
        np.testing.assert_allclose(_run(undone, x), want, rtol=0, atol=atol)
