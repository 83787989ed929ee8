"""``NAS``: one object for a YOLO-NAS checkpoint — ``.info() .val() .predict() .export()``."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from nasquant.data.coco_names import COCO_CLASSES
from nasquant.data.datasets import load_dataset
from nasquant.data.preprocess import Preprocess, check_input_size
from nasquant.data.sources import image_files
from nasquant.errors import NasquantError
from nasquant.eval.postprocess import NMSSettings
from nasquant.eval.validate import validate
from nasquant.formats import DEFAULT_IMGSZ, MAX_STRIDE
from nasquant.models import YoloNAS, yolo_nas
from nasquant.predict import PREDICT_NMS, Prediction, predict
from nasquant.runtime.torch_backend import TorchBackend
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


class NAS:
    """A YOLO-NAS detector loaded from a checkpoint path (.pt/.pth/.safetensors), folder, URL or alias.

    >>> model = NAS("yolo_nas_s")          # doctest: +SKIP
    >>> model.val(data="coco8.yaml")["map50_95"]  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str | os.PathLike = "yolo_nas_s",
        *,
        variant: str | None = None,
        num_classes: int | None = None,
        sha256: str | None = None,
        device: str | None = None,
    ) -> None:
        self.checkpoint = load_checkpoint(model, variant=variant, num_classes=num_classes, sha256=sha256)
        self.model: YoloNAS = load_model(self.checkpoint)
        self.device = device
        names = self.checkpoint.class_names
        if not names:
            # Deci's COCO checkpoints carry no names; their 80 outputs are COCO's classes in order.
            names = list(COCO_CLASSES) if self.model.num_classes == len(COCO_CLASSES) else None
        self.names: list[str] = names or [f"class{i}" for i in range(self.model.num_classes)]

    @property
    def variant(self) -> str:
        return self.model.variant

    @property
    def imgsz(self) -> int:
        """The input size the checkpoint was made for (its recorded processing), else 640."""
        processing = self.checkpoint.processing or {}
        return int(processing.get("imgsz", DEFAULT_IMGSZ))

    def preprocessing(self, protocol: str = "sg", imgsz: int | None = None) -> Preprocess:
        size = check_input_size(self.imgsz if imgsz is None else imgsz)
        return Preprocess.from_protocol(protocol, size, model_processing=self.checkpoint.processing)

    def fuse(self) -> NAS:
        """Re-parameterize the network in place for faster inference (same outputs to float rounding)."""
        self.model.fuse()
        return self

    def backend(self, device: str | None = None, precision: str = "fp32") -> TorchBackend:
        return TorchBackend(self.model, device=device or self.device, precision=precision)

    def info(self, imgsz: int = DEFAULT_IMGSZ) -> dict:
        """Variant, classes, parameters, GFLOPs and conv-layer count (of the deployed, fused form)."""
        check_input_size(imgsz)
        deployed = copy.deepcopy(self.model).fuse()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            deployed(torch.zeros(1, 3, imgsz, imgsz))
        convs = [m for m in deployed.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
        return {
            "source": str(self.checkpoint.path),
            "sha256": self.checkpoint.sha256,
            "variant": self.variant,
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
        protocol: str = "sg",
        batch: int = 8,
        *,
        conf: float = 0.01,
        iou: float = 0.7,
        top_k: int = 1000,
        max_det: int = 300,
        device: str | None = None,
        progress: bool = True,
    ) -> dict:
        """COCO metrics on ``data`` (COCO json/folder or Ultralytics yaml); mAPs are fractions (0.475)."""
        dataset = load_dataset(data)
        spec = self.preprocessing(protocol, imgsz)
        nms = NMSSettings(conf=conf, iou=iou, top_k=top_k, max_det=max_det)
        metrics = validate(self.backend(device), dataset, spec, nms=nms, batch_size=batch, progress=progress)
        metrics.update(
            model=str(self.checkpoint.path), variant=self.variant, imgsz=spec.imgsz, protocol=protocol
        )
        return metrics

    def predict(
        self,
        source: str | os.PathLike | np.ndarray | Sequence[str | os.PathLike | np.ndarray],
        conf: float = PREDICT_NMS.conf,
        iou: float = PREDICT_NMS.iou,
        imgsz: int | None = None,
        protocol: str = "sg",
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
        return predict(
            self.backend(device),
            sources,
            self.preprocessing(protocol, imgsz),
            self.names,
            nms=nms,
            save_dir=save_dir,
            progress=progress,
        )

    __call__ = predict

    def onnx_metadata(self, protocol: str = "sg", imgsz: int | None = None) -> dict[str, str]:
        """What a consumer of an exported graph needs besides the graph: names, preprocessing, stride."""
        from nasquant.export import onnx as keys

        spec = self.preprocessing(protocol, imgsz)
        return {
            keys.KEY_NAMES: json.dumps(self.names),
            keys.KEY_VARIANT: self.variant,
            keys.KEY_PROTOCOL: protocol,
            keys.KEY_PREPROCESS: json.dumps(asdict(spec)),
            keys.KEY_STRIDE: str(MAX_STRIDE),
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

        size = self.preprocessing(protocol, imgsz).imgsz
        target = Path(path) if path else Path(self.checkpoint.path).with_suffix(".onnx")
        deployed = self.model if self.model.is_fused else copy.deepcopy(self.model).fuse()
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
        return f"NAS({self.variant}, {self.model.num_classes} classes, {Path(self.checkpoint.path).name})"


def val_exported(
    path: str | os.PathLike,
    data: str | os.PathLike,
    *,
    protocol: str | None = None,
    imgsz: int | None = None,
    batch: int = 8,
    nms: NMSSettings | None = None,
    device: str | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """COCO metrics of an exported ``.onnx`` graph or ``.engine``, preprocessed as its metadata
    records (unless overridden)."""
    from nasquant.export import onnx as keys
    from nasquant.runtime import open_backend

    backend = open_backend(path, device=device, threads=threads)
    recorded = backend.metadata.get(keys.KEY_PREPROCESS)
    size = imgsz if imgsz is not None else backend.input_size
    if recorded and protocol in (None, backend.metadata.get(keys.KEY_PROTOCOL)) and imgsz in (None, size):
        spec = _recorded_preprocess(recorded, path)
    else:
        spec = Preprocess.from_protocol(protocol or "sg", check_input_size(size or DEFAULT_IMGSZ))
    if backend.input_size not in (None, spec.imgsz):
        raise NasquantError(f"{path} takes {backend.input_size}px inputs, not {spec.imgsz}")
    # A fixed-batch graph runs exactly its batch (the backend pads a short last batch).
    batch = backend.batch_size or batch
    metrics = validate(backend, load_dataset(data), spec, nms=nms, batch_size=batch, progress=progress)
    metrics.update(
        model=str(path),
        variant=backend.metadata.get(keys.KEY_VARIANT, Path(path).suffix.lstrip(".")),
        imgsz=spec.imgsz,
        protocol=protocol or backend.metadata.get(keys.KEY_PROTOCOL, "sg"),
    )
    return metrics


def _recorded_preprocess(recorded: str, path: str | os.PathLike) -> Preprocess:
    """The preprocessing an exported file records in its metadata (any runtime's file: checked)."""
    try:
        fields = json.loads(recorded)
        return Preprocess(**fields)
    except (ValueError, TypeError) as exc:  # not JSON, not an object, unknown or missing fields
        raise NasquantError(f"{path}: its recorded preprocessing is unreadable ({exc})") from None


def _expand(item: str | os.PathLike | np.ndarray) -> list:
    return [item] if isinstance(item, np.ndarray) else image_files(item)
