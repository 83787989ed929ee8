"""The FP32 deployment formats of one network: ONNX (raw or end-to-end), a TensorRT engine built from
it on this GPU, or OpenVINO IR converted from it. INT8 formats come from the quantize pipeline's stages
(:mod:`nasquant.pipeline.export_job`), which end in the same writers."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from nasquant.artifacts import END_TO_END_TAG, ENGINE_SUFFIXES, IR_SUFFIX, ONNX_SUFFIX, engine_path
from nasquant.errors import NasquantError
from nasquant.export.onnx import export_onnx
from nasquant.settings import ExportFormat, NMSSettings

#: the suffix of each format's main file
SUFFIXES: dict[str, str] = {"onnx": ONNX_SUFFIX, "engine": ENGINE_SUFFIXES[0], "openvino": IR_SUFFIX}


def export_fp32(
    model: torch.nn.Module,
    target: str | os.PathLike,
    export_format: ExportFormat,
    *,
    imgsz: int,
    metadata: Mapping[str, str],
    dynamic_batch: bool = False,
    opset: int = 17,
    simplify: bool = True,
    nms: NMSSettings | None = None,
    fp16: bool = False,
) -> list[Path]:
    """Write ``model`` (fused, float) as ``export_format`` at ``target``; return the files written, the
    one to ship first. An engine or IR is made from an ONNX graph written beside it (kept: it is the
    portable artifact). ``fp16``: an FP16 engine, or IR with half-precision weights."""
    target = Path(target)
    if export_format not in SUFFIXES:
        raise NasquantError(f"{export_format} is an INT8 format: it needs calibration (a recipe or --calib)")
    if target.suffix.lower() != SUFFIXES[export_format]:
        raise NasquantError(
            f"{export_format} export writes a {SUFFIXES[export_format]} file, not {target.name}"
        )
    if export_format == "engine":
        from nasquant.cuda import tensorrt_unavailable

        reason = tensorrt_unavailable()
        if reason is not None:
            raise NasquantError(
                f"an engine is built on the GPU it runs on, and this machine cannot ({reason}); export "
                "--format onnx and build it there (`nasquant engine command` prints the trtexec line)"
            )
    onnx_path = target if export_format == "onnx" else target.with_suffix(ONNX_SUFFIX)
    export_onnx(
        model,
        onnx_path,
        imgsz=imgsz,
        dynamic_batch=dynamic_batch,
        opset=opset,
        simplify=simplify,
        metadata=metadata,
        nms=nms,
    )
    if export_format == "onnx":
        return [onnx_path]
    if export_format == "openvino":
        from nasquant.export.openvino import export_openvino

        xml = export_openvino(onnx_path, target, compress_to_fp16=fp16)
        return [xml, xml.with_suffix(".bin"), onnx_path]
    return [_engine(onnx_path, target, "fp16" if fp16 else "fp32"), onnx_path]


def _engine(onnx_path: Path, target: Path, precision: str) -> Path:
    from nasquant.export.engine_plan import EngineSettings, EngineSource
    from nasquant.export.tensorrt import build_engine
    from nasquant.recipe import EnginesSection

    source = EngineSource.inspect(onnx_path)
    settings = EngineSettings(precision, source.profile(None, None, None), EnginesSection())
    build_engine(onnx_path, target, settings)
    return target


def default_target(source: str | os.PathLike, export_format: ExportFormat, *, nms: bool, fp16: bool) -> Path:
    """Where an FP32 export goes by default: beside the checkpoint, ``yolo_nas_s.onnx``,
    ``yolo_nas_s-nms.onnx``, ``yolo_nas_s.fp16.engine``, ``yolo_nas_s.xml``."""
    stem = Path(source).stem + (END_TO_END_TAG if nms else "")
    path = Path(source).with_name(stem + SUFFIXES[export_format])
    if export_format == "engine":
        return engine_path(path.with_suffix(ONNX_SUFFIX), "fp16" if fp16 else "fp32")
    return path
