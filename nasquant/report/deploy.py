"""``DEPLOY.md``: the hand-off from a run folder to whoever ships the model on a T4 or a Jetson.

Engines are tied to a TensorRT version and a GPU, so what travels is the ONNX: the guide gives the
exact commands that turn it into an engine on the target (nasquant's builder where TensorRT Python
is installed, ``trtexec`` where it is not, e.g. on many JetPack images) and time it, which TensorRT
versions and boards those commands hold for (weak-typing deprecation, DLA, JetPack 5), and the
input/output contract with the pre- and post-processing a C++ consumer has to reproduce.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from nasquant.artifacts import DEPLOY_MD, END_TO_END_OUTPUT_NAMES, INPUT_NAME, OUTPUT_NAMES, engine_path
from nasquant.data.preprocess import Preprocess
from nasquant.export.engine_plan import (
    EngineSettings,
    autocast_command,
    trtexec_command,
    trtexec_fp16_fallback_command,
    trtexec_timing_command,
)
from nasquant.io import atomic_path
from nasquant.settings import NMSSettings


def write_deploy_guide(run_dir: str | os.PathLike, guide: str) -> Path:
    """Write a rendered guide (:func:`render_deploy_guide`) to ``run_dir/DEPLOY.md``, atomically."""
    path = Path(run_dir) / DEPLOY_MD
    with atomic_path(path) as tmp:
        tmp.write_text(guide)
    return path


def render_deploy_guide(
    *,
    fp32_onnx: Path,
    int8_onnx: Path,
    settings: EngineSettings,
    spec: Preprocess,
    nms: NMSSettings,
    class_names: list[str],
    skipped_layers: list[str],
    fixed_batch: int | None = None,
    end_to_end: list[Path] | None = None,
    end_to_end_nms: NMSSettings | None = None,
) -> str:
    """The guide's Markdown; file paths appear as given (the pipeline passes names beside the guide).
    ``end_to_end``: the run's end-to-end (NMS inside) graphs, built with ``end_to_end_nms``."""
    fp16, int8 = replace(settings, precision="fp16"), replace(settings, precision="int8")
    strong = replace(int8, engines=replace(settings.engines, typing="strong"))
    dla_engines = replace(settings.engines, dla_core=0, gpu_fallback=True, hardware_compatibility="none")
    dla = replace(int8, engines=dla_engines)
    if settings.profile is not None:
        bounds = (settings.profile.min, settings.profile.opt, settings.profile.max)
        batch = "dynamic batch, min/opt/max " + "/".join(str(shape[0]) for shape in bounds)
    else:
        batch = f"fixed batch N = {fixed_batch}"
    lines = [
        "# Deploying this run",
        "",
        f"Files: `{fp32_onnx}` (FP32 graph, for FP16 engines) and `{int8_onnx}` (INT8 QDQ graph, explicit",
        "quantization for TensorRT: int8 weights feeding DequantizeLinear, a QuantizeLinear/DequantizeLinear",
        "pair before each quantized input). Build the engine **on the target**: an engine only runs on the TensorRT",
        "version and GPU architecture that built it (nasquant's `.engine.json` sidecar records both and its",
        "runner refuses a mismatch in one line).",
        "",
        f"Layers kept in floating point in the INT8 graph: {', '.join(f'`{n}`' for n in skipped_layers) or 'none'}.",
        "",
        "## T4 / any x86 GPU server with TensorRT's Python package",
        "",
        "```bash",
        "pip install 'nasquant[tensorrt]'",
        f"nasquant engine build {int8_onnx} --int8   # -> {engine_path(int8_onnx, 'int8').name} + .json sidecar",
        f"nasquant engine build {fp32_onnx} --fp16",
        f"nasquant val --model {engine_path(int8_onnx, 'int8').name} --data <annotations>  # the engine's mAP",
        f"nasquant bench --model {engine_path(int8_onnx, 'int8').name}                # CUDA-event latency",
        "```",
        "",
        "The same engines with `trtexec` (TensorRT 10, weak typing: builder flags allow FP16/INT8):",
        "",
        "```bash",
        _trtexec(int8_onnx, int8, "10"),
        _trtexec(fp32_onnx, fp16, "10"),
        "```",
        "",
        "TensorRT 10.12 deprecated weak typing, and `trtexec` 10.14 and newer prints `Weakly-typed networks",
        "have been deprecated in TensorRT` for any line with `--int8` or `--fp16`. It is a warning only: the",
        "engine builds and runs as before. TensorRT 11 removes weak typing. To build strongly typed on 10.x",
        "already (no warning), set `engines.typing: strong` in the recipe (`--typing strong` for `nasquant",
        "engine build` / `engine command`): ModelOpt AutoCast writes the FP16 parts into the graph (Q/DQ nodes",
        "kept), and the builder follows the graph's types:",
        "",
        "```bash",
        autocast_command(int8_onnx),
        _trtexec(int8_onnx, strong, "10"),
        "```",
        "",
        "TensorRT 11 builds strongly typed networks only (no precision flags, no `--stronglyTyped`), from the",
        "same AutoCast graph:",
        "",
        "```bash",
        _trtexec(int8_onnx, int8, "11"),
        "```",
        "",
        "## Jetson Orin (JetPack 6.1+, TensorRT 10.3)",
        "",
        "Copy the ONNX file to the device and build there (JetPack images often lack TensorRT's Python",
        "package; `trtexec` is in `/usr/src/tensorrt/bin`). On the GPU:",
        "",
        "```bash",
        _trtexec(int8_onnx, int8, "10"),
        "```",
        "",
        "### DLA (TensorRT 10.x only)",
        "",
        "The DLA cores of an AGX Orin or Orin NX (the Orin Nano has none) need the TensorRT 10.x that JetPack 6",
        "ships. NVIDIA documents no DLA in TensorRT 11.0 to 11.3 and DLA only on Windows on ARM in 11.4.0",
        '("Working with DLA"), and nasquant refuses `engines.dla_core` with those versions. TensorRT 11.4.1',
        "brings DLA back on an AGX Orin with JetPack 7.2.2+ (strongly typed); nasquant has not been tried there.",
        "On DLA core 0, with the layers the DLA cannot run falling back to the GPU:",
        "",
        "```bash",
        _trtexec(int8_onnx, dla, "10"),
        "```",
        "",
        "## Timing an engine with `trtexec`",
        "",
        "Time a built engine on the machine that built it, at the batch it is tuned for:",
        "",
        "```bash",
        _timing(int8_onnx, int8),
        _timing(fp32_onnx, fp16),
        _timing(int8_onnx, dla),
        "```",
        "",
        "Read `GPU Compute Time: ... median = X ms` in the performance summary: the GPU time of one inference",
        "of the whole batch (`--shapes`; a fixed-batch engine runs its own N). It covers the engine alone:",
        "`--noDataTransfers` leaves out the host<->device copies, and none of the pre-processing (decode,",
        "letterbox, / 255) or post-processing (candidates, NMS, box mapping) below runs in the engine. An",
        "application's end-to-end latency adds those. `Throughput` counts inferences per second; multiply by",
        "the batch for images per second.",
        "",
        "## JetPack 5 / Xavier (TensorRT 8.5): not supported, and what works instead",
        "",
        "Xavier boards stop at JetPack 5 (TensorRT 8.5 from JetPack 5.1); nasquant builds with TensorRT 10 and",
        "refuses older versions. Its builder creates the network without the EXPLICIT_BATCH flag (TensorRT 10",
        "has explicit batch only; TensorRT 8's ONNX parser refuses such a network) and follows the build",
        "through IProgressMonitor, which TensorRT 8 does not have. The `trtexec` lines above use",
        "`--skipInference` and `--builderOptimizationLevel`, which TensorRT 8.5's `trtexec` does not know.",
        "What remains on a Xavier:",
        "",
        "- An FP16 engine from the FP32 graph. TensorRT 8.5 parses ONNX up to opset 17, nasquant's default",
        "  export opset. This line uses only options TensorRT 8.5's `trtexec` has, and times the engine once",
        "  built; the timing line above works there too. Not tested by nasquant. It writes no `.engine.json`",
        "  sidecar, so `nasquant val`/`bench` cannot run the engine: compare its detections with the FP32 ONNX",
        "  yourself.",
        "",
        "  ```bash",
        "  " + trtexec_fp16_fallback_command(fp32_onnx, engine_path(fp32_onnx, "fp16"), settings.profile),
        "  ```",
        "",
        "- INT8 from the QDQ graph. It stays within what TensorRT 8.5's ONNX parser lists (DequantizeLinear",
        "  on INT8 with zero points of 0, per-channel weight scales), but nasquant has not built it with 8.5:",
        "  whether 8.5 builds int8 weight initializers feeding DequantizeLinear is not tested.",
        "- No TensorRT: the ONNX Runtime CPU flavour (`*.int8.cpu.onnx`) runs the same INT8 model on the CPU.",
        "",
        "## Intel CPUs / iGPUs: OpenVINO",
        "",
        "`nasquant export --model <checkpoint> --format openvino --int8 --recipe <recipe>` writes the IR",
        "(`.xml` + `.bin`) from the CPU flavour; `nasquant val --model <ir>.xml` checks it. A quantize run with",
        "OpenVINO installed writes it too (`model.int8.cpu.xml`: the report's OpenVINO INT8 row measures that",
        "file). The IR's stem is the strided conv: the `.onnx` reads the image space-to-depth, ONNX Runtime's",
        "fast path and one more pass on OpenVINO. Handing OpenVINO an",
        "`.onnx` yourself: use `ov.convert_model` (what nasquant does), not `core.read_model`, which skips the",
        "converter's transformations and computes the TensorRT flavour's signed activation grids differently",
        "(-1.2 mAP points on the shapes fixture; the CPU flavour is unaffected; benchmarks/openvino.md).",
        "OpenVINO's CPU default compute is bf16 where the CPU has it: pin `INFERENCE_PRECISION_HINT` to",
        "`f32` to get the validated numbers.",
        "",
        "## Input / output contract",
        "",
        f"- input `{INPUT_NAME}`: float32, N x 3 x {spec.imgsz} x {spec.imgsz} ({batch}), RGB, NCHW, values in [0, 1]",
        f"- output `{OUTPUT_NAMES[0]}`: float32, N x A x 4, boxes as x1, y1, x2, y2 in input-image pixels",
        f"- output `{OUTPUT_NAMES[1]}`: float32, N x A x {len(class_names)}, per-class probabilities (sigmoid applied)",
        "",
        *_end_to_end_section(end_to_end or [], end_to_end_nms, len(class_names)),
        "## Pre-processing (reproduce exactly: mAP depends on it)",
        "",
        "1. Decode to RGB uint8 (OpenCV decodes BGR: convert).",
        f"2. Scale so the longer side is {spec.resize} px, keeping the aspect ratio: "
        f"`scale = min({spec.resize} / h, {spec.resize} / w)`, new size "
        + (
            "`int(h * scale) x int(w * scale)` (rounded down)"
            if spec.rounding == "floor"
            else "`round(h * scale) x round(w * scale)`"
        )
        + ", bilinear (`cv2.INTER_LINEAR`).",
        f"3. Pad to {spec.imgsz} x {spec.imgsz} with value {spec.pad_value} on all channels, image centred: "
        f"`top = ({spec.imgsz} - new_h) / 2`, `left = ({spec.imgsz} - new_w) / 2` (integer division).",
        "4. HWC -> CHW, float32, divide by 255.",
        "",
        "## Post-processing",
        "",
        f"1. Candidates: every (anchor, class) pair with probability > {nms.conf}"
        + ("" if nms.multi_label else " (best class per anchor only)")
        + f"; keep the {nms.top_k} highest.",
        f"2. Class-aware NMS: within a class, a box with IoU > {nms.iou} with a higher-scoring box is dropped.",
        f"3. Keep at most {nms.max_det} detections, highest score first.",
        "4. Map boxes to the original image: subtract (left, top), divide x by new_w / w and y by new_h / h,",
        "   clip to the image.",
        "",
        "These are the recipe's validation thresholds: a low conf (0.01) is what mAP needs; an application",
        "typically shows detections above 0.25-0.5.",
        "",
        "## Classes",
        "",
        ", ".join(f"{i}: {name}" for i, name in enumerate(class_names)),
        "",
    ]
    return "\n".join(lines)


def _end_to_end_section(files: list[Path], nms: NMSSettings | None, classes: int) -> list[str]:
    if files and nms is not None:
        names = ", ".join(f"`{path}`" for path in files)
        intro = [
            f"{names} end in detections: NMS built in with conf {nms.conf}, IoU {nms.iou}, top-k {nms.top_k},",
            f"at most {nms.max_det} detections per image (K). Build an engine from the `-nms.trt` graph with the",
            "lines above, the file name swapped.",
        ]
    else:
        intro = [
            "Set `export.nms: true` in the recipe (or run `nasquant export --nms`) for graphs that end in",
            "detections, NMS built in with the `export.nms_*` settings (default: predict's conf 0.25).",
        ]
    k = nms.max_det if files and nms is not None else "K"
    return [
        "## End-to-end graphs (NMS inside)",
        "",
        *intro,
        "Their outputs replace `boxes`/`scores`, in TensorRT EfficientNMS's convention:",
        "",
        f"- `{END_TO_END_OUTPUT_NAMES[0]}`: int32, N x 1, detections per image",
        f"- `{END_TO_END_OUTPUT_NAMES[1]}`: float32, N x {k} x 4, x1, y1, x2, y2 in input-image pixels",
        f"- `{END_TO_END_OUTPUT_NAMES[2]}`: float32, N x {k}, best first",
        f"- `{END_TO_END_OUTPUT_NAMES[3]}`: int32, N x {k}, class ids 0..{classes - 1}",
        "",
        "Rows past `num_dets` are zero. Only step 4 of the post-processing below (back to the original",
        "image) is left to the application. The NMS is the standard ONNX `NonMaxSuppression` (per class)",
        "between TopK selections, so ONNX Runtime and OpenVINO run the same file, and TensorRT's ONNX parser",
        "builds it into its native NMS layer (`INMSLayer`, TensorRT 8.6+): no plugin library to ship, where",
        "an `EfficientNMS_TRT` plugin node would run on TensorRT alone. nasquant's tests check the",
        "detections equal its own post-processing (ONNX Runtime); a TensorRT build of it has not been run yet.",
        "",
    ]


def _trtexec(onnx_path: Path, settings: EngineSettings, tensorrt_version: str) -> str:
    return trtexec_command(
        onnx_path, _engine(onnx_path, settings), settings, tensorrt_version=tensorrt_version
    )


def _timing(onnx_path: Path, settings: EngineSettings) -> str:
    return trtexec_timing_command(_engine(onnx_path, settings), settings)


def _engine(onnx_path: Path, settings: EngineSettings) -> Path:
    """The engine name the guide's build lines write: ``*.dlaN.engine`` for a DLA build."""
    engine = engine_path(onnx_path, settings.precision)
    if settings.engines.dla_core is not None:
        engine = engine.with_name(engine.name.replace(".engine", f".dla{settings.engines.dla_core}.engine"))
    return engine
