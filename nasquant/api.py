"""``NAS``: one object for a YOLO-NAS checkpoint or exported file — ``.info() .val() .predict() .export()``."""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_args

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from nasquant.artifacts import (
    DEFAULT_IMGSZ,
    ENGINE_SUFFIXES,
    EXPORTED_SUFFIXES,
    IR_SUFFIX,
    KEY_FLAVOR,
    KEY_FP_LAYERS,
    KEY_INPUT_SIZE,
    KEY_NAMES,
    KEY_PRECISION,
    KEY_PREPROCESS,
    KEY_PROTOCOL,
    KEY_VARIANT,
    KEY_VERSION,
    file_sha256,
    read_metadata,
)
from nasquant.data.datasets import load_dataset
from nasquant.data.preprocess import Preprocess, check_input_size
from nasquant.data.sources import count_frames, iter_frames
from nasquant.detector import Detector
from nasquant.errors import NasquantError
from nasquant.eval.metrics import DetectionMetrics
from nasquant.eval.postprocess import resolve_nms
from nasquant.eval.validate import validate
from nasquant.models import YoloNAS
from nasquant.predict import PredictionWriter, iter_results, next_free_folder
from nasquant.recipe import Recipe
from nasquant.results import Results
from nasquant.runtime import Backend, TorchBackend, check_device, open_backend
from nasquant.settings import DEFAULT_PREDICT_DIR, PREDICT_NMS, VAL_NMS, ExportFormat, NMSSettings
from nasquant.weights import Checkpoint


@dataclass(frozen=True)
class ExportedFile:
    """An exported ``.onnx`` graph or TensorRT engine, as read before it runs: its file, its sha256 and
    what it records about itself (names, variant, preprocessing: :mod:`nasquant.artifacts`' keys)."""

    path: Path
    sha256: str
    metadata: dict[str, str]

    @classmethod
    def read(cls, path: str | os.PathLike, *, sha256: str | None = None) -> ExportedFile:
        path = Path(path)
        if not path.is_file():
            raise NasquantError(f"{path}: no such file")
        digest = file_sha256(path)
        if sha256 is not None and digest != sha256.lower():
            raise NasquantError(f"{path}: sha256 {digest} does not match the expected {sha256}")
        return cls(path, digest, read_metadata(path))

    @property
    def names(self) -> list[str] | None:
        recorded = self.metadata.get(KEY_NAMES)
        if recorded is None:
            return None
        try:
            names = json.loads(recorded)
        except ValueError:
            names = None
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise NasquantError(f"{self.path}: its recorded class names are unreadable")
        return names

    @property
    def input_size(self) -> int | None:
        recorded = self.metadata.get(KEY_INPUT_SIZE)
        return int(recorded) if recorded and recorded.isdigit() else None

    def preprocessing(self, protocol: str | None, imgsz: int | None) -> Preprocess:
        """The recorded preprocessing, unless another protocol or size is asked for; a graph with a
        fixed input side refuses any other."""
        size = imgsz if imgsz is not None else self.input_size
        recorded = self.metadata.get(KEY_PREPROCESS)
        if recorded and protocol in (None, self.metadata.get(KEY_PROTOCOL)):
            try:
                spec = Preprocess(**json.loads(recorded))
            except (ValueError, TypeError) as exc:  # not JSON, not an object, unknown or missing fields
                raise NasquantError(
                    f"{self.path}: its recorded preprocessing is unreadable ({exc})"
                ) from None
            if size in (None, spec.imgsz):
                return spec
        spec = Preprocess.from_protocol(self.protocol(protocol), check_input_size(size or DEFAULT_IMGSZ))
        if self.input_size not in (None, spec.imgsz):
            raise NasquantError(f"{self.path} takes {self.input_size}px inputs, not {spec.imgsz}")
        return spec

    def protocol(self, asked: str | None) -> str:
        return asked or self.metadata.get(KEY_PROTOCOL) or "sg"


class NAS:
    """A YOLO-NAS detector: ``.info() .val() .predict() .export()`` on one object.

    ``model`` is a checkpoint (.pt/.pth/.safetensors), a folder, a URL or an alias (``yolo_nas_s``), or
    an exported file: an ``.onnx`` graph (a run folder's ``model.int8.cpu.onnx``, say), OpenVINO IR
    (``.xml``) or a TensorRT ``.engine``. An exported file is run as it is (ONNX Runtime, OpenVINO or
    TensorRT) and read as it records itself (names, preprocessing); ``export`` and quantization need the
    checkpoint it came from.

    >>> model = NAS("yolo_nas_s")          # doctest: +SKIP
    >>> model.val(data="coco8.yaml").box.map  # doctest: +SKIP
    >>> NAS("runs/shapes_s_int8/model.int8.cpu.onnx")("bus.jpg")[0].boxes.xyxy  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str | os.PathLike = "yolo_nas_s",
        *,
        variant: str | None = None,
        num_classes: int | None = None,
        sha256: str | None = None,
        device: str | None = None,
        threads: int | None = None,
    ) -> None:
        self.device, self.threads = device, threads
        self.exported: ExportedFile | None = None
        self._detector: Detector | None = None
        if Path(model).suffix.lower() in EXPORTED_SUFFIXES:
            check_device(model, device)  # a wrong device is the first thing said, as for a checkpoint
            self.exported = ExportedFile.read(model, sha256=sha256)
            names = self.exported.names
            recorded_variant = self.exported.metadata.get(KEY_VARIANT)
            if variant is not None and recorded_variant not in (None, variant):
                raise NasquantError(f"{model} holds {recorded_variant}, not {variant}")
            if num_classes is not None and names is not None and len(names) != num_classes:
                raise NasquantError(f"{model} has {len(names)} classes, not {num_classes}")
        else:
            self._detector = Detector(model, variant=variant, num_classes=num_classes, sha256=sha256)
            names = self._detector.names
        self._names: list[str] = names or []

    @property
    def names(self) -> list[str]:
        """Class names by id; empty for an exported graph that records none (ids are shown instead)."""
        return self._detector.names if self._detector is not None else self._names

    @names.setter
    def names(self, names: list[str]) -> None:
        if self._detector is not None:
            self._detector.names = list(names)
        self._names = list(names)

    @property
    def detector(self) -> Detector:
        """The checkpoint's network with its names and preprocessing; an exported file has none."""
        self._needs_checkpoint()
        return self._detector

    @property
    def checkpoint(self) -> Checkpoint:
        return self.detector.checkpoint

    @property
    def model(self) -> YoloNAS:
        """The torch network (a checkpoint's); an exported file has none."""
        return self.detector.model

    def _needs_checkpoint(self) -> None:
        if self.exported is not None:
            raise NasquantError(
                f"{self.exported.path} is an exported file: export and quantization need the checkpoint "
                "it came from (.pt/.pth/.safetensors)"
            )

    @property
    def source(self) -> Path:
        return self.exported.path if self.exported is not None else Path(self.checkpoint.path)

    @property
    def variant(self) -> str:
        if self.exported is not None:
            return self.exported.metadata.get(KEY_VARIANT, "unknown")
        return self.model.variant

    @property
    def imgsz(self) -> int:
        """The input size the model was made for (recorded processing or graph input), else 640."""
        if self.exported is not None:
            return self.exported.preprocessing(None, None).imgsz
        return self.detector.imgsz

    def preprocessing(self, protocol: str | None = None, imgsz: int | None = None) -> Preprocess:
        """How images are prepared for this model: ``protocol`` ``sg`` (Deci's COCO protocol) or
        ``letterbox``; None takes the model's own (an exported file's recorded one, else ``sg``)."""
        if self.exported is not None:
            return self.exported.preprocessing(protocol, imgsz)
        return self.detector.preprocessing(protocol, imgsz)

    def fuse(self) -> NAS:
        """Re-parameterize the network in place for faster inference (same outputs to float rounding);
        an exported file is already in its deployed form."""
        if self.exported is None:
            self.detector.fuse()
        return self

    def backend(self, device: str | None = None, precision: str | None = None) -> Backend:
        """A runner for this model (close it, or use ``with``): torch for a checkpoint (``precision``
        fp32/fp16), ONNX Runtime or TensorRT for an exported file (its precision is the file's)."""
        if self.exported is None:
            return TorchBackend(self.model, device=device or self.device, precision=precision or "fp32")
        if precision is not None:
            raise NasquantError(f"{self.exported.path}: an exported file runs at its own precision")
        return open_backend(self.exported.path, device=device or self.device, threads=self.threads)

    def info(self, imgsz: int = DEFAULT_IMGSZ, verbose: bool = True) -> dict:
        """What the model is: variant, classes, input size, preprocessing; for a checkpoint also
        parameters, GFLOPs and conv layers (of the fused form), for an exported file its precision,
        INT8 flavour and the layers it keeps in floating point. Printed as a table when ``verbose``."""
        info = self._describe(imgsz)
        if verbose:
            print(describe(info))
        return info

    def _describe(self, imgsz: int) -> dict:
        common = {"source": str(self.source), "variant": self.variant}
        if self.exported is not None:
            metadata = self.exported.metadata
            fp_layers = metadata.get(KEY_FP_LAYERS)
            return {
                **common,
                "sha256": self.exported.sha256,
                "format": _file_format(self.exported.path),
                "num_classes": len(self.names) or None,
                "names": self.names,
                "precision": metadata.get(KEY_PRECISION),
                "flavor": metadata.get(KEY_FLAVOR) or None,
                "fp_layers": json.loads(fp_layers) if fp_layers else [],
                "file_mb": round(self.exported.path.stat().st_size / 1e6, 2),
                "nasquant_version": metadata.get(KEY_VERSION),
                "input_size": self.imgsz,
                "preprocessing": asdict(self.preprocessing()),
            }
        check_input_size(imgsz)
        deployed = copy.deepcopy(self.model).fuse()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            deployed(torch.zeros(1, 3, imgsz, imgsz))
        convs = [m for m in deployed.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
        return {
            **common,
            "sha256": self.checkpoint.sha256,
            "format": "checkpoint",
            "num_classes": self.model.num_classes,
            "names": self.names,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "parameters_fused": sum(p.numel() for p in deployed.parameters()),
            "gflops": round(counter.get_total_flops() / 1e9, 2),
            "gflops_imgsz": imgsz,
            "conv_layers": len(convs),
            "fused": self.model.is_fused,
            "input_size": self.imgsz,
            "preprocessing": self.checkpoint.processing,
        }

    def val(
        self,
        data: str | os.PathLike,
        imgsz: int | None = None,
        protocol: str | None = None,
        batch: int = 8,
        *,
        conf: float | None = None,
        iou: float | None = None,
        top_k: int | None = None,
        max_det: int | None = None,
        multi_label: bool | None = None,
        device: str | None = None,
        progress: bool = True,
        verbose: bool = True,
    ) -> DetectionMetrics:
        """COCO metrics on ``data`` (COCO json/folder or Ultralytics yaml): ``.box.map``, ``.box.map50``,
        ``.box.maps``..., fractions (0.475); ``.results_dict`` holds every number. ``verbose`` prints
        the per-class table.

        NMS settings left None are the validation defaults (:data:`~nasquant.settings.VAL_NMS`), or an
        end-to-end graph's built-in ones, which given values must match."""
        dataset = load_dataset(data)
        spec = self.preprocessing(protocol, imgsz)
        with self.backend(device) as backend:
            nms = resolve_nms(
                backend, VAL_NMS, conf=conf, iou=iou, top_k=top_k, max_det=max_det, multi_label=multi_label
            )
            # A fixed-batch graph runs exactly its batch (the backend pads a short last batch).
            size = backend.batch_size or batch
            metrics = validate(backend, dataset, spec, nms=nms, batch_size=size, progress=progress)
        used = self.exported.protocol(protocol) if self.exported is not None else protocol or "sg"
        metrics.update(model=str(self.source), variant=self.variant, imgsz=spec.imgsz, protocol=used)
        result = DetectionMetrics(metrics)
        if verbose:
            print(
                f"{metrics['variant']} on {metrics['dataset']} (imgsz {metrics['imgsz']}, protocol "
                f"{metrics['protocol']}, {metrics['backend']} {metrics['precision']} {metrics['device']})\n"
                f"{result.table()}\n"
                # pycocotools has no value for an area range without ground truth: shown as "n/a".
                + "  ".join(f"{key}=" + ("n/a" if metrics[key] is None else f"{metrics[key]:.4f}") for key in
                            ("map50_95", "map50", "map75", "map_small", "map_medium", "map_large"))
            )  # fmt: skip
        return result

    def predict(
        self,
        source: Any,
        conf: float | None = None,
        iou: float | None = None,
        imgsz: int | None = None,
        protocol: str | None = None,
        *,
        max_det: int | None = None,
        multi_label: bool | None = None,
        agnostic: bool | None = None,
        stream: bool = False,
        save: bool = False,
        save_dir: str | os.PathLike | None = None,
        exist_ok: bool = False,
        device: str | None = None,
        progress: bool = False,
    ) -> list[Results] | Iterator[Results]:
        """Detect objects: one :class:`~nasquant.results.Results` per image or video frame.

        ``source``: image/video path, folder, glob, URL, webcam index, numpy array (**BGR**, as
        ``cv2.imread`` gives), PIL image (RGB), torch tensor (RGB 0-1, CHW or NCHW), or a list of those.
        ``stream``: a generator (constant memory on videos and streams) instead of a list.
        NMS settings left None are the predict defaults (:data:`~nasquant.settings.PREDICT_NMS`: one class
        per box), or an end-to-end graph's built-in ones, which given values must match.
        ``save`` (or a ``save_dir``): annotated images/videos and ``predictions.json`` in ``save_dir``
        (default ``runs/predict``), or ``save_dir2``, ``save_dir3``... when it exists, unless ``exist_ok``.
        """
        spec = self.preprocessing(protocol, imgsz)  # bad settings fail here, even for a generator
        folder = None
        if save or save_dir is not None:
            folder = next_free_folder(save_dir if save_dir is not None else DEFAULT_PREDICT_DIR, exist_ok)
        asked = {
            "conf": conf,
            "iou": iou,
            "max_det": max_det,
            "multi_label": multi_label,
            "agnostic": agnostic,
        }
        results = self._results(source, spec, asked, folder, device, progress)
        return results if stream else list(results)

    def _results(
        self,
        source: Any,
        spec: Preprocess,
        asked: dict[str, Any],
        folder: Path | None,
        device: str | None,
        progress: bool,
    ) -> Iterator[Results]:
        """The generator behind :meth:`predict`: it holds the backend (and the writer) open while the
        caller iterates, and closes them when the frames run out or the caller stops."""
        names = dict(enumerate(self.names))
        with self.backend(device) as backend:
            nms = resolve_nms(backend, PREDICT_NMS, **asked)
            frames = tqdm(
                iter_frames(source), total=count_frames(source), desc="predict", disable=not progress
            )
            with frames, PredictionWriter(folder) if folder else contextlib.nullcontext() as writer:
                for result in iter_results(backend, frames, spec, names, nms=nms):
                    if writer is not None:
                        writer.add(result)
                    yield result

    __call__ = predict

    def onnx_metadata(self, protocol: str = "sg", imgsz: int | None = None) -> dict[str, str]:
        """What a consumer of an exported graph needs besides the graph: names, preprocessing, stride."""
        return self.detector.onnx_metadata(protocol, imgsz)

    def export(
        self,
        path: str | os.PathLike | None = None,
        *,
        format: ExportFormat = "onnx",
        imgsz: int | None = None,
        protocol: str = "sg",
        dynamic_batch: bool = False,
        opset: int = 17,
        simplify: bool = True,
        nms: bool | NMSSettings = False,
        fp16: bool = False,
        int8: bool = False,
        recipe: str | os.PathLike | Recipe | None = None,
        calib: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> Path:
        """Export for deployment; returns the file to ship.

        ``format``: ``onnx`` (FP32 graph), ``onnx-int8`` (the INT8 graphs, TensorRT and CPU flavours),
        ``engine`` (a TensorRT engine built here: FP32, ``fp16``, or ``int8``) or ``openvino`` (IR: FP32,
        ``fp16`` weights, or ``int8``). ``nms``: the graph ends in detections (True: the predict
        settings; or given :class:`~nasquant.settings.NMSSettings`).

        INT8 runs the quantize pipeline's stages (calibration, float-layer choice, export) from
        ``recipe`` (a path or :class:`~nasquant.recipe.Recipe`; its model becomes this checkpoint), or
        from ``calib`` images with the box branch in float; ``path`` is then the run folder (default:
        the recipe's, else ``runs/export/<checkpoint>-int8``). Otherwise ``path`` is the file to write
        (default: beside the checkpoint).
        """
        if format not in get_args(ExportFormat):
            raise NasquantError(f"unknown export format {format!r}; use {', '.join(get_args(ExportFormat))}")
        int8 = int8 or format == "onnx-int8"
        if int8 and fp16:
            raise NasquantError("choose fp16 or int8 (an INT8 engine runs its float layers in FP16 anyway)")
        if fp16 and format == "onnx":
            raise NasquantError(
                "an FP16 graph is made on the target: export FP32 and build --format engine --fp16"
            )
        settings = (PREDICT_NMS if nms is True else nms) or None
        if int8:  # the size given, else the recipe's input.size, else the checkpoint's own
            return self._export_int8(path, format, imgsz, dynamic_batch, settings, recipe, calib, progress)
        size = self.preprocessing(protocol, imgsz).imgsz
        if recipe is not None or calib is not None:
            raise NasquantError("a recipe or calibration data is for INT8 exports: add int8=True")
        from nasquant.export.formats import default_target, export_fp32

        checkpoint = self.checkpoint.path
        target = (
            Path(path) if path else default_target(checkpoint, format, nms=settings is not None, fp16=fp16)
        )
        files = export_fp32(
            self.detector.deployed(),
            target,
            format,
            imgsz=size,
            metadata=self.onnx_metadata(protocol, size),
            dynamic_batch=dynamic_batch,
            opset=opset,
            simplify=simplify,
            nms=settings,
            fp16=fp16,
        )
        return files[0]

    def _export_int8(
        self,
        path: str | os.PathLike | None,
        format: str,
        imgsz: int | None,
        dynamic_batch: bool,
        nms: NMSSettings | None,
        recipe: str | os.PathLike | Recipe | None,
        calib: str | os.PathLike | None,
        progress: bool,
    ) -> Path:
        from nasquant.pipeline import run_export
        from nasquant.pipeline.export_job import export_recipe

        checkpoint = self.checkpoint.path
        base = export_recipe(
            recipe, checkpoint=checkpoint, calib=calib, imgsz=imgsz, dynamic_batch=dynamic_batch, nms=nms
        )
        output = path or (
            None if recipe is not None else Path("runs", "export", f"{Path(checkpoint).stem}-int8")
        )
        result = run_export(
            base, "onnx-int8" if format == "onnx" else format, output=output, progress=progress
        )
        return result.files[0]

    def __repr__(self) -> str:
        return f"NAS({self.variant}, {len(self.names) or '?'} classes, {self.source.name})"


def _file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    return "tensorrt" if suffix in ENGINE_SUFFIXES else "openvino" if suffix == IR_SUFFIX else "onnx"


def describe(info: dict) -> str:
    """:meth:`NAS.info`'s dict as the aligned two-column table it prints."""
    names = info["names"]
    shown = ", ".join(names[:10]) + (f", … ({len(names)} total)" if len(names) > 10 else "")
    rows = [
        ("source", info["source"]),
        ("sha256", info["sha256"]),
        ("format", info["format"]),
        ("variant", info["variant"]),
        ("classes", f"{info['num_classes'] or '?'}: {shown or 'no names recorded'}"),
    ]
    if info["format"] == "checkpoint":
        rows += [
            ("parameters", f"{info['parameters']:,} (fused: {info['parameters_fused']:,})"),
            (f"GFLOPs @{info['gflops_imgsz']}", f"{info['gflops']:.2f} (fused; 2 FLOPs per multiply-add)"),
            ("conv layers", f"{info['conv_layers']} (fused)"),
        ]
    else:
        flavor = f" ({info['flavor']} flavour)" if info["flavor"] else ""
        rows += [
            ("precision", f"{info['precision'] or 'not recorded'}{flavor}"),
            ("kept in float", ", ".join(info["fp_layers"]) or "none recorded"),
            ("file size", f"{info['file_mb']} MB"),
        ]
    rows += [
        ("input size", str(info["input_size"])),
        ("preprocessing", str(info["preprocessing"] or "not recorded (Deci COCO default)")),
    ]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)
