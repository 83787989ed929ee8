"""Prediction on images, written once for every backend, plus drawing and saving the results."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from nasquant.data.preprocess import Preprocess, preprocess, read_image
from nasquant.errors import NasquantError
from nasquant.eval.postprocess import detect
from nasquant.io import atomic_path, write_json
from nasquant.runtime.base import Backend
from nasquant.settings import PREDICT_NMS, NMSSettings


@dataclass
class Prediction:
    """Detections for one image, boxes in original-image pixels (x1, y1, x2, y2)."""

    source: str
    height: int
    width: int
    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    names: Sequence[str]

    def __len__(self) -> int:
        return len(self.scores)

    def label(self, class_id: int) -> str:
        """The class's name, or its id where the model records no names."""
        return self.names[class_id] if 0 <= class_id < len(self.names) else str(class_id)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "height": self.height,
            "width": self.width,
            "detections": [
                {
                    "box": [round(float(v), 2) for v in box],
                    "score": round(float(score), 5),
                    "class_id": int(cls),
                    "class_name": self.label(int(cls)),
                }
                for box, score, cls in zip(self.boxes, self.scores, self.class_ids, strict=True)
            ],
        }


def _images(sources: Sequence[str | os.PathLike | np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    for index, item in enumerate(sources):
        if isinstance(item, np.ndarray):
            if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
                raise NasquantError(
                    f"array input must be an RGB uint8 HxWx3 image, got {item.dtype} {item.shape}"
                )
            yield f"array{index}", item
        else:
            yield os.fspath(item), read_image(item)


def predict(
    backend: Backend,
    sources: Sequence[str | os.PathLike | np.ndarray],
    spec: Preprocess,
    names: Sequence[str],
    *,
    nms: NMSSettings = PREDICT_NMS,
    save_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> list[Prediction]:
    """Detect objects in each source (image path or RGB array), one image per forward pass.

    With ``save_dir``, also write an annotated JPEG per image and ``predictions.json`` there.
    """
    if save_dir is not None:
        _check_output_folder(Path(save_dir), sources)
    predictions = []
    saved_names: set[str] = set()
    with tqdm(_images(sources), total=len(sources), desc="predict", disable=not progress) as bar:
        for source, image in bar:
            tensor, transform = preprocess(image, spec)
            (detections,) = detect(backend, tensor[None], nms)
            prediction = Prediction(
                source=source,
                height=image.shape[0],
                width=image.shape[1],
                boxes=transform.to_original(detections.boxes),
                scores=detections.scores,
                class_ids=detections.class_ids,
                names=names,
            )
            predictions.append(prediction)
            if save_dir is not None:
                _save_annotated(image, prediction, Path(save_dir), saved_names)
    if save_dir is not None:
        write_json(Path(save_dir) / "predictions.json", [p.to_dict() for p in predictions])
    return predictions


def _check_output_folder(out_dir: Path, sources: Sequence[str | os.PathLike | np.ndarray]) -> None:
    """Outputs land directly in ``out_dir`` (``<stem>.jpg``, ``predictions.json``): a folder that holds
    a source image would get that image replaced by its annotated re-encode, so it is refused."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NasquantError(f"output folder {out_dir} is a file")
    target = out_dir.resolve()
    for item in sources:
        if not isinstance(item, np.ndarray) and Path(item).resolve().parent == target:
            raise NasquantError(
                f"output folder {out_dir} holds the input {item}: annotated images would replace inputs; "
                "choose another output folder"
            )


def _save_annotated(image: np.ndarray, prediction: Prediction, out_dir: Path, used: set[str]) -> None:
    stem = Path(prediction.source).stem
    name, suffix = stem, 1
    while name in used:  # two inputs named alike in different folders must not overwrite each other
        name, suffix = f"{stem}_{suffix}", suffix + 1
    used.add(name)
    ok, encoded = cv2.imencode(".jpg", draw(image, prediction))
    if not ok:
        raise NasquantError(f"could not encode the annotated image for {prediction.source}")
    with atomic_path(out_dir / f"{name}.jpg") as tmp:
        tmp.write_bytes(encoded.tobytes())


def _class_colour(class_id: int) -> tuple[int, int, int]:
    # A fixed golden-ratio hue walk: stable colours per class without a palette table.
    hue = int((class_id * 0.618033988749895 % 1.0) * 179)
    bgr = cv2.cvtColor(np.uint8([[[hue, 200, 255]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def draw(image_rgb: np.ndarray, prediction: Prediction) -> np.ndarray:
    """Return a BGR copy of the image with boxes and ``name score`` labels drawn on it."""
    canvas = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    thickness = max(1, round(max(canvas.shape[:2]) / 400))
    for box, score, cls in zip(prediction.boxes, prediction.scores, prediction.class_ids, strict=True):
        colour = _class_colour(int(cls))
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thickness)
        label = f"{prediction.label(int(cls))} {score:.2f}"
        (tw, th), baseline = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness, thickness)
        top = max(y1 - th - baseline, 0)
        cv2.rectangle(canvas, (x1, top), (x1 + tw, top + th + baseline), colour, -1)
        cv2.putText(
            canvas, label, (x1, top + th), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness, (0, 0, 0), thickness
        )
    return canvas
