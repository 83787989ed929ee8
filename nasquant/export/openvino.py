"""OpenVINO IR (``model.xml`` + ``model.bin``) from an exported ONNX graph, keeping nasquant's metadata.

The OpenVINO backend (:class:`~nasquant.runtime.OpenVINOBackend`) opens an ONNX graph too, converting it
on every load (about 1.5 s); the IR is what an OpenVINO deployment ships: converted once, weights
memory-mapped from the ``.bin``. Both go through ``ov.convert_model`` (:mod:`nasquant.openvino`), so
they run the same model. An INT8 Q/DQ graph becomes FakeQuantize on activations over int8 weight
constants, so its IR stays about a quarter of the FP32 one's size and OpenVINO's CPU plugin runs its
convolutions on integer kernels. The ONNX metadata (class names, preprocessing, precision, ...) goes into
the IR's ``rt_info`` (:data:`nasquant.artifacts.IR_METADATA`), where ``read_metadata`` finds it.
The CPU flavour's space-to-depth stem (a fast path on ONNX Runtime only) becomes the strided conv again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from nasquant.artifacts import IR_SUFFIX, IR_WEIGHTS_SUFFIX, KEY_PRECISION, ONNX_SUFFIX, read_metadata
from nasquant.errors import NasquantError
from nasquant.export.conv_layouts import undo_space_to_depth_input_convs
from nasquant.export.onnx_files import load_onnx, save_onnx
from nasquant.io import PART_SUFFIX
from nasquant.openvino import convert_onnx, import_openvino, set_ir_metadata

_PURPOSE = "OpenVINO IR export"


def export_openvino(
    onnx_path: str | os.PathLike, xml_path: str | os.PathLike, *, compress_to_fp16: bool = False
) -> Path:
    """Convert an exported ``.onnx`` into OpenVINO IR at ``xml_path`` (weights in the ``.bin`` beside
    it) carrying the ONNX's metadata; returns ``xml_path``.

    ``compress_to_fp16`` stores float weights as FP16 (OpenVINO's own default, half the size). It is off
    here so the IR of an FP32 graph really holds FP32 weights; when on, an FP32 graph's IR records its
    precision as ``fp16``, so a report row says what the file holds.

    Atomic: the IR is written into a temporary folder beside ``xml_path``, then the ``.bin`` and the
    ``.xml`` are renamed into place, so a reader finds the complete pair or no ``.xml`` at all.
    """
    ov = import_openvino(_PURPOSE)
    source, xml_path = Path(onnx_path), Path(xml_path)
    if source.suffix.lower() != ONNX_SUFFIX:
        raise NasquantError(f"{source}: OpenVINO IR export converts an {ONNX_SUFFIX} graph")
    if xml_path.suffix.lower() != IR_SUFFIX:
        raise NasquantError(
            f"{xml_path}: an OpenVINO IR is written as {IR_SUFFIX} (with its {IR_WEIGHTS_SUFFIX})"
        )
    metadata = read_metadata(source)  # also refuses a missing or unreadable ONNX file, in one line
    if compress_to_fp16 and metadata.get(KEY_PRECISION) == "fp32":
        metadata[KEY_PRECISION] = "fp16"
    with tempfile.TemporaryDirectory(prefix="nasquant-openvino-") as folder:
        model = convert_onnx(_strided_stem(source, Path(folder)), _PURPOSE)
    set_ir_metadata(model, metadata)
    _save_atomically(ov, model, xml_path, compress_to_fp16=compress_to_fp16)
    return xml_path


def _strided_stem(source: Path, folder: Path) -> Path:
    """``source``, or where it reads its input space-to-depth (the CPU flavour's stem, ONNX Runtime's
    fast path), a copy in ``folder`` with the strided conv back: OpenVINO's fast path is the strided
    conv, its SpaceToDepth one more pass over the image (``benchmarks/openvino.md``). Same sums."""
    graph = load_onnx(source)
    if not any(node.op_type == "SpaceToDepth" for node in graph.graph.node):
        return source
    return save_onnx(undo_space_to_depth_input_convs(graph), folder / source.name)


def _save_atomically(ov: ModuleType, model: Any, xml_path: Path, *, compress_to_fp16: bool) -> None:
    # A process killed mid-write leaves its hidden ``.<name>.*.part`` folder behind, never a partial IR.
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{xml_path.name}.", suffix=PART_SUFFIX, dir=xml_path.parent))
    try:
        staged = folder / xml_path.name  # OpenVINO pairs foo.xml with foo.bin by name: keep both names
        ov.save_model(model, str(staged), compress_to_fp16=compress_to_fp16)
        # The .xml is what a reader opens. An old one goes first, so it never meets the new .bin, and the
        # new one comes last: an interruption leaves no .xml rather than a mismatched pair.
        xml_path.unlink(missing_ok=True)
        os.replace(staged.with_suffix(IR_WEIGHTS_SUFFIX), xml_path.with_suffix(IR_WEIGHTS_SUFFIX))
        os.replace(staged, xml_path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
