"""Crafted bad inputs, each built at test time and a few KB at most: pickle and YAML bombs, broken
checkpoints, datasets and reports. The hardening tests feed them to the CLI and the loaders."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file

from tests.weights.conftest import write_zip_pickle

# Raw pickle opcodes, spelled out so a test says exactly which structure it builds.
_PROTO2 = b"\x80\x02"
_EMPTY_DICT, _EMPTY_LIST, _EMPTY_TUPLE = b"}", b"]", b")"
_TUPLE2, _APPEND, _SETITEM, _NONE, _POP, _STOP = b"\x86", b"a", b"s", b"N", b"0", b"."


def onnx_model(graph: onnx.GraphProto, opset: int = 17) -> onnx.ModelProto:
    """A hand-built graph as a model with the lowest IR version its opset allows, as torch's exporter
    writes it: ``helper.make_model``'s default is the newest IR the installed onnx knows, which an
    older ONNX Runtime refuses ("Unsupported model IR version") before the test's own point is reached."""
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))


def identity_model(path: Path, *, quantized: bool) -> Path:
    """A two-output stand-in graph without nasquant metadata, optionally holding one Q/DQ pair."""
    nodes, inits, source = [], [], "images"
    if quantized:
        inits = [
            numpy_helper.from_array(np.array(0.01, np.float32), "scale"),
            numpy_helper.from_array(np.array(128, np.uint8), "zero"),
        ]
        nodes = [
            helper.make_node("QuantizeLinear", ["images", "scale", "zero"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"]),
        ]
        source = "dq"
    nodes += [
        helper.make_node("Identity", [source], ["boxes"]),
        helper.make_node("Identity", [source], ["scores"]),
    ]
    shape = ["n", 3, 8, 8]
    graph = helper.make_graph(
        nodes,
        "stand_in",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in ("boxes", "scores")],
        inits,
    )
    onnx.save(onnx_model(graph), str(path))
    return path


def _binput(index: int) -> bytes:
    return b"r" + struct.pack("<I", index)  # LONG_BINPUT


def _binget(index: int) -> bytes:
    return b"j" + struct.pack("<I", index)  # LONG_BINGET


def doubling_tuple_ops(levels: int) -> bytes:
    """Opcodes leaving t_levels on the stack, where t_0 = () and t_(k+1) = (t_k, t_k) via two memo
    references: a few bytes per level, 2^levels nodes to hash, compare or print."""
    ops = _EMPTY_TUPLE + _binput(0) + _POP
    for level in range(levels):
        ops += _binget(level) + _binget(level) + _TUPLE2 + _binput(level + 1) + _POP
    return ops + _binget(levels)


def tuple_key_bomb(levels: int = 40) -> bytes:
    """``{t_levels: None}``: inserting the key hashes 2^levels tuples (minutes at 40 levels)."""
    return _PROTO2 + _EMPTY_DICT + doubling_tuple_ops(levels) + _NONE + _SETITEM + _STOP


def persistent_id_bomb(levels: int = 40) -> bytes:
    """A persistent id that is t_levels: printing it in an error message never ends."""
    return _PROTO2 + doubling_tuple_ops(levels) + b"Q" + _STOP  # BINPERSID


def nesting_bomb(depth: int = 100_000) -> bytes:
    """A list nested ``depth`` deep: anything recursive over it overflows the stack."""
    return _PROTO2 + _EMPTY_LIST * depth + _APPEND * (depth - 1) + _STOP


def memo_bomb() -> bytes:
    """A memo index of 2^32 - 1: the C unpickler grows its memo array to that many slots."""
    return _PROTO2 + _NONE + _binput(0xFFFFFFFF) + _STOP


def zip_checkpoint(path: Path, payload: bytes) -> Path:
    """A torch-format .pt whose data.pkl is ``payload``."""
    return write_zip_pickle(path, payload)


def legacy_checkpoint(path: Path, payload: bytes) -> Path:
    """A pre-1.6 (non-zip) torch file: magic number, version and system info pickles, then ``payload``."""
    header = b"".join(
        pickle.dumps(value, protocol=2)
        for value in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True})
    )
    path.write_bytes(header + payload)
    return path


def stride_zero_checkpoint(path: Path) -> Path:
    """A state dict whose one fp16 tensor is a single stored value viewed as 10^12 elements."""
    big = torch.zeros(1, dtype=torch.float16).expand(1_000_000, 1_000_000)
    torch.save({"heads.head1.cls_pred.weight": big}, path)
    return path


def safetensors_checkpoint(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def yaml_alias_bomb(levels: int = 9) -> str:
    """A data yaml of a few hundred bytes whose nested aliases expand to 10^levels strings."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        refs = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"a{level}: &a{level} [{refs}]")
    lines.append(f"val: *a{levels - 1}")
    lines.append("names: [x]")
    return "\n".join(lines) + "\n"


def coco_json(path: Path, files: list[Path], *, annotations: list[dict] | None = None, **override) -> Path:
    """A small COCO json over the image ``files`` with one category; ``override`` replaces top-level lists."""
    data = {
        "images": [
            {"id": index + 1, "file_name": image.name, "height": 64, "width": 64}
            for index, image in enumerate(files)
        ],
        "annotations": annotations if annotations is not None else [],
        "categories": [{"id": 1, "name": "thing"}],
    }
    data.update(override)
    path.write_text(json.dumps(data))
    return path


def png_image(path: Path, seed: int = 0, size: int = 64) -> Path:
    """A small random-texture PNG (distinct per seed)."""
    import cv2

    rng = np.random.default_rng(seed)
    pixels = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (size, size))
    assert cv2.imwrite(str(path), pixels)
    return path


def report_json(path: Path, int8_map: object, *, int8_status: str = "ok", delta: object = "derive") -> Path:
    """A report.json with an FP32 and an INT8 row; the INT8 mAP (and its delta) as given, even NaN."""
    fp32 = 0.8
    if delta == "derive":
        delta = int8_map - fp32 if isinstance(int8_map, float) else None
    rows = [
        {"name": "ORT FP32", "backend": "onnxruntime", "precision": "fp32", "status": "ok", "map50_95": fp32},
        {
            "name": "ORT INT8",
            "backend": "onnxruntime",
            "precision": "int8",
            "status": int8_status,
            "map50_95": int8_map,
            "delta_map50_95": delta,
        },
    ]
    buffer = io.StringIO()
    json.dump({"recipe": {}, "host": {}, "rows": rows}, buffer)  # NaN is written as NaN, as Python does
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buffer.getvalue())
    return path


def onnx_with_outside_data(path: Path) -> Path:
    """An ONNX graph whose initializer's external data points outside its folder (``../secret``)."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "4")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["images", "w"], ["boxes"])],
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 3, 32, 32])],
        initializer=[weight],
    )
    onnx.save(onnx_model(graph), str(path))
    return path


def zip_bomb(path: Path, megabytes: int = 64) -> Path:
    """A torch-looking zip whose storage record deflates from a few KB to ``megabytes`` MB."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        archive.writestr("archive/data/0", b"\0" * (megabytes << 20))
    return path


def fake_engine(path: Path, **sidecar: object) -> Path:
    """A file that is no engine, with a sidecar nasquant accepts (its sha256 matches): what a runner
    reads before TensorRT itself is asked to deserialize anything. ``sidecar`` overrides the fields."""
    from nasquant.artifacts import EngineSidecar, file_sha256

    path.write_bytes(b"serialized engine")
    fields = {
        "tensorrt_version": "10.3.0",
        "gpu_name": "Tesla T4",
        "compute_capability": "7.5",
        "precision": "int8",
        "typing": "weak",
        "hardware_compatibility": "none",
        "inputs": [],
        "outputs": [],
        "onnx_sha256": "0" * 64,
        "engine_sha256": file_sha256(path),
    }
    EngineSidecar(**{**fields, **sidecar}).write(path)
    return path
