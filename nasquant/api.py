"""``NAS``: one object for a YOLO-NAS checkpoint or exported file — ``.info() .val() .predict() .export()``."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from nasquant.artifacts import (
    DEFAULT_IMGSZ,
    ENGINE_SUFFIXES,
    EXPORTED_SUFFIXES,
    KEY_FLAVOR,
    KEY_FP_LAYERS,
    KEY_INPUT_SIZE,
    KEY_NAMES,
    KEY_PRECISION,
    KEY_PREPROCESS,
    KEY_PROTOCOL,
    KEY_STRIDE,
    KEY_VARIANT,
    KEY_VERSION,
    MAX_STRIDE,
    file_sha256,
    read_metadata,
)
from nasquant.data.coco_names import COCO_CLASSES
from nasquant.data.datasets import load_dataset
from nasquant.data.preprocess import Preprocess, check_input_size
from nasquant.data.sources import image_files
from nasquant.errors import NasquantError
from nasquant.eval.validate import validate
from nasquant.models import YoloNAS, yolo_nas
from nasquant.predict import Prediction, predict
from nasquant.runtime import Backend, TorchBackend, check_device, open_backend
from nasquant.settings import PREDICT_NMS, VAL_NMS, NMSSettings
from nasquant.weights import Checkpoint, load_checkpoint


def load_model(checkpoint: Checkpoint) -> YoloNAS:
    """Build the network the checkpoint describes and load its tensors strictly, in eval mode."""
    model = yolo_nas(checkpoint.variant, checkpoint.num_classes)
    model.adopt_layout(checkpoint.state_dict)
    problem = _state_dict_mismatch(model.state_dict(), checkpoint.state_dict)
    if problem is not None:
        raise NasquantError(f"{checkpoint.path} does not fit {checkpoint.variant}: {problem}")
    model.load_state_dict(checkpoint.state_dict, strict=True)
    return model.eval()


def _state_dict_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str | None:
    """The first difference between two state dicts, naming the key (torch's own error lists every
    key over many lines); None when ``given`` loads strictly."""
    problems = [
        *(f"no tensor {key}" for key in expected if key not in given),
        *(f"unexpected tensor {key}" for key in given if key not in expected),
        *(
            f"{key} has shape {tuple(given[key].shape)}, the network needs {tuple(value.shape)}"
            for key, value in expected.items()
            if key in given and given[key].shape != value.shape
        ),
    ]
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else "")


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
    an exported file: an ``.onnx`` graph (a run folder's ``model.int8.cpu.onnx``, say) or a TensorRT
    ``.engine``. An exported file is run as it is (ONNX Runtime or TensorRT) and read as it records
    itself (names, preprocessing); ``export`` and quantization need the checkpoint it came from.

    >>> model = NAS("yolo_nas_s")          # doctest: +SKIP
    >>> model.val(data="coco8.yaml")["map50_95"]  # doctest: +SKIP
    >>> NAS("runs/shapes_s_int8/model.int8.cpu.onnx").predict("bus.jpg")  # doctest: +SKIP
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
        self._checkpoint: Checkpoint | None = None
        self._model: YoloNAS | None = None
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
            self._checkpoint = load_checkpoint(model, variant=variant, num_classes=num_classes, sha256=sha256)
            self._model = load_model(self._checkpoint)
            names = self._checkpoint.class_names
            if not names:
                # Deci's COCO checkpoints carry no names; their 80 outputs are COCO's classes in order.
                count = self._model.num_classes
                names = (
                    list(COCO_CLASSES) if count == len(COCO_CLASSES) else [f"class{i}" for i in range(count)]
                )
        #: class names by id; empty for an exported graph that records none (ids are shown instead)
        self.names: list[str] = names or []

    @property
    def checkpoint(self) -> Checkpoint:
        self._needs_checkpoint()
        return self._checkpoint

    @property
    def model(self) -> YoloNAS:
        """The torch network (a checkpoint's); an exported file has none."""
        self._needs_checkpoint()
        return self._model

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
        processing = self.checkpoint.processing or {}
        return int(processing.get("imgsz", DEFAULT_IMGSZ))

    def preprocessing(self, protocol: str | None = None, imgsz: int | None = None) -> Preprocess:
        """How images are prepared for this model: ``protocol`` ``sg`` (Deci's COCO protocol) or
        ``letterbox``; None takes the model's own (an exported file's recorded one, else ``sg``)."""
        if self.exported is not None:
            return self.exported.preprocessing(protocol, imgsz)
        size = check_input_size(self.imgsz if imgsz is None else imgsz)
        return Preprocess.from_protocol(protocol or "sg", size, model_processing=self.checkpoint.processing)

    def fuse(self) -> NAS:
        """Re-parameterize the network in place for faster inference (same outputs to float rounding);
        an exported file is already in its deployed form."""
        if self.exported is None:
            self.model.fuse()
        return self

    def backend(self, device: str | None = None, precision: str | None = None) -> Backend:
        """A runner for this model (close it, or use ``with``): torch for a checkpoint (``precision``
        fp32/fp16), ONNX Runtime or TensorRT for an exported file (its precision is the file's)."""
        if self.exported is None:
            return TorchBackend(self.model, device=device or self.device, precision=precision or "fp32")
        if precision is not None:
            raise NasquantError(f"{self.exported.path}: an exported file runs at its own precision")
        return open_backend(self.exported.path, device=device or self.device, threads=self.threads)

    def info(self, imgsz: int = DEFAULT_IMGSZ) -> dict:
        """What the model is: variant, classes, input size, preprocessing; for a checkpoint also
        parameters, GFLOPs and conv layers (of the fused form), for an exported file its precision,
        INT8 flavour and the layers it keeps in floating point."""
        common = {"source": str(self.source), "variant": self.variant}
        if self.exported is not None:
            metadata = self.exported.metadata
            fp_layers = metadata.get(KEY_FP_LAYERS)
            return {
                **common,
                "sha256": self.exported.sha256,
                "format": "tensorrt" if self.exported.path.suffix.lower() in ENGINE_SUFFIXES else "onnx",
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
        conf: float = VAL_NMS.conf,
        iou: float = VAL_NMS.iou,
        top_k: int = VAL_NMS.top_k,
        max_det: int = VAL_NMS.max_det,
        device: str | None = None,
        progress: bool = True,
    ) -> dict:
        """COCO metrics on ``data`` (COCO json/folder or Ultralytics yaml); mAPs are fractions (0.475)."""
        dataset = load_dataset(data)
        spec = self.preprocessing(protocol, imgsz)
        nms = NMSSettings(conf=conf, iou=iou, top_k=top_k, max_det=max_det)
        with self.backend(device) as backend:
            # A fixed-batch graph runs exactly its batch (the backend pads a short last batch).
            size = backend.batch_size or batch
            metrics = validate(backend, dataset, spec, nms=nms, batch_size=size, progress=progress)
        used = self.exported.protocol(protocol) if self.exported is not None else protocol or "sg"
        metrics.update(model=str(self.source), variant=self.variant, imgsz=spec.imgsz, protocol=used)
        return metrics

    def predict(
        self,
        source: str | os.PathLike | np.ndarray | Sequence[str | os.PathLike | np.ndarray],
        conf: float = PREDICT_NMS.conf,
        iou: float = PREDICT_NMS.iou,
        imgsz: int | None = None,
        protocol: str | None = None,
        *,
        max_det: int = PREDICT_NMS.max_det,
        save_dir: str | os.PathLike | None = None,
        device: str | None = None,
        progress: bool = False,
    ) -> list[Prediction]:
        """Detections per image (boxes xyxy in original pixels, scores, class ids); optionally saved."""
        items = [source] if isinstance(source, np.ndarray | str | os.PathLike) else list(source)
        sources = [image for item in items for image in _expand(item)]
        nms = NMSSettings(conf=conf, iou=iou, top_k=PREDICT_NMS.top_k, max_det=max_det)
        spec = self.preprocessing(protocol, imgsz)
        with self.backend(device) as backend:
            return predict(backend, sources, spec, self.names, nms=nms, save_dir=save_dir, progress=progress)

    __call__ = predict

    def onnx_metadata(self, protocol: str = "sg", imgsz: int | None = None) -> dict[str, str]:
        """What a consumer of an exported graph needs besides the graph: names, preprocessing, stride."""
        spec = self.preprocessing(protocol, imgsz)
        return {
            KEY_NAMES: json.dumps(self.names),
            KEY_VARIANT: self.variant,
            KEY_PROTOCOL: protocol,
            KEY_PREPROCESS: json.dumps(asdict(spec)),
            KEY_STRIDE: str(MAX_STRIDE),
        }

    def export(
        self,
        path: str | os.PathLike | None = None,
        *,
        imgsz: int | None = None,
        protocol: str = "sg",
        dynamic_batch: bool = False,
        opset: int = 17,
        simplify: bool = True,
    ) -> Path:
        """Export the fused FP32 network to ONNX (INT8 graphs come from ``nasquant quantize``)."""
        from nasquant.export import export_onnx

        model = self.model
        size = self.preprocessing(protocol, imgsz).imgsz
        target = Path(path) if path else Path(self.checkpoint.path).with_suffix(".onnx")
        deployed = model if model.is_fused else copy.deepcopy(model).fuse()
        return export_onnx(
            deployed,
            target,
            imgsz=size,
            dynamic_batch=dynamic_batch,
            opset=opset,
            simplify=simplify,
            metadata=self.onnx_metadata(protocol, size),
        )

    def __repr__(self) -> str:
        return f"NAS({self.variant}, {len(self.names) or '?'} classes, {self.source.name})"


def _expand(item: str | os.PathLike | np.ndarray) -> list:
    return [item] if isinstance(item, np.ndarray) else image_files(item)
