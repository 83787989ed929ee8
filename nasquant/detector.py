"""A checkpoint's network with what every stage needs around it: class names, input size,
preprocessing and the metadata an exported graph records. The :class:`~nasquant.api.NAS` facade and
the pipeline's stages both work from it (the facade sits above the pipeline, the pipeline above this).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict

import torch

from nasquant.artifacts import (
    DEFAULT_IMGSZ,
    KEY_NAMES,
    KEY_PREPROCESS,
    KEY_PROTOCOL,
    KEY_STRIDE,
    KEY_VARIANT,
    MAX_STRIDE,
)
from nasquant.data.coco_names import COCO_CLASSES
from nasquant.data.preprocess import Preprocess, check_input_size
from nasquant.errors import NasquantError
from nasquant.models import YoloNAS, yolo_nas
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


class Detector:
    """A YOLO-NAS network loaded from a checkpoint (.pt/.pth/.safetensors, folder, URL or alias)."""

    def __init__(
        self,
        source: str | os.PathLike,
        *,
        variant: str | None = None,
        num_classes: int | None = None,
        sha256: str | None = None,
    ) -> None:
        self.checkpoint: Checkpoint = load_checkpoint(
            source, variant=variant, num_classes=num_classes, sha256=sha256
        )
        self.model: YoloNAS = load_model(self.checkpoint)
        names = self.checkpoint.class_names
        if not names:
            # Deci's COCO checkpoints carry no names; their 80 outputs are COCO's classes in order.
            count = self.model.num_classes
            names = list(COCO_CLASSES) if count == len(COCO_CLASSES) else [f"class{i}" for i in range(count)]
        #: class names by id
        self.names: list[str] = list(names)

    @property
    def variant(self) -> str:
        return self.model.variant

    @property
    def imgsz(self) -> int:
        """The input size the checkpoint records it was made for, else 640."""
        processing = self.checkpoint.processing or {}
        return int(processing.get("imgsz", DEFAULT_IMGSZ))

    def preprocessing(self, protocol: str | None = None, imgsz: int | None = None) -> Preprocess:
        """How images are prepared: ``protocol`` ``sg`` (Deci's COCO protocol, the default) or
        ``letterbox``, at ``imgsz`` (default: the checkpoint's own)."""
        size = check_input_size(self.imgsz if imgsz is None else imgsz)
        return Preprocess.from_protocol(protocol or "sg", size, model_processing=self.checkpoint.processing)

    def fuse(self) -> Detector:
        """Re-parameterize the network in place for inference (same outputs to float rounding)."""
        self.model.fuse()
        return self

    def deployed(self) -> YoloNAS:
        """The fused network: this one when already fused, else a fused copy (this one untouched)."""
        return self.model if self.model.is_fused else copy.deepcopy(self.model).fuse()

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
