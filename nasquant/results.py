"""What ``NAS.predict`` returns, shaped like Ultralytics' ``Results``: one object per image holding
its :class:`Boxes` (``.xyxy .xywh .xyxyn .conf .cls``), the original BGR image, class names, timings,
and ``.plot() .save() .show() .to_json() .to_df()``.

Arrays are numpy; ``Boxes.torch()`` (or ``Results.torch()``) gives torch tensors where code expects
Ultralytics' ``.cpu().numpy()`` chain.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from nasquant.errors import NasquantError
from nasquant.io import atomic_path


def _stack(columns: list[Any]) -> Any:
    """Columns side by side, for numpy arrays or torch tensors alike."""
    if isinstance(columns[0], np.ndarray):
        return np.stack(columns, axis=-1)
    import torch

    return torch.stack(columns, dim=-1)


class Boxes:
    """Detections of one image: ``data`` is (n, 6) ``x1, y1, x2, y2, conf, cls`` in original pixels,
    best score first; ``orig_shape`` is (height, width)."""

    def __init__(self, data: Any, orig_shape: tuple[int, int]) -> None:
        if data.ndim != 2 or data.shape[1] != 6:
            raise NasquantError(
                f"boxes data must be (n, 6) x1, y1, x2, y2, conf, cls; got {tuple(data.shape)}"
            )
        self.data = data
        self.orig_shape = orig_shape

    @property
    def xyxy(self) -> Any:
        return self.data[:, :4]

    @property
    def conf(self) -> Any:
        return self.data[:, 4]

    @property
    def cls(self) -> Any:
        """Class ids (float, as Ultralytics; ``.astype(int)`` / ``.int()`` to index names)."""
        return self.data[:, 5]

    @property
    def xywh(self) -> Any:
        """Centre x, centre y, width, height."""
        x1, y1, x2, y2 = (self.data[:, i] for i in range(4))
        return _stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])

    @property
    def xyxyn(self) -> Any:
        """``xyxy`` divided by the image's width and height."""
        return self.xyxy / self._scale()

    @property
    def xywhn(self) -> Any:
        return self.xywh / self._scale()

    def _scale(self) -> Any:
        height, width = self.orig_shape
        scale = np.array([width, height, width, height], dtype=np.float32)
        if isinstance(self.data, np.ndarray):
            return scale
        import torch

        return torch.from_numpy(scale).to(self.data.device)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: Any) -> Boxes:
        data = self.data[index]
        return Boxes(data[None] if data.ndim == 1 else data, self.orig_shape)

    def numpy(self) -> Boxes:
        """These boxes with numpy data."""
        if isinstance(self.data, np.ndarray):
            return self
        return Boxes(self.data.detach().cpu().numpy(), self.orig_shape)

    def torch(self, device: str | None = None) -> Boxes:
        """These boxes with torch tensors (on ``device``)."""
        import torch

        return Boxes(torch.as_tensor(self.data, device=device), self.orig_shape)

    def cpu(self) -> Boxes:
        return self if isinstance(self.data, np.ndarray) else Boxes(self.data.cpu(), self.orig_shape)

    def __repr__(self) -> str:
        return f"Boxes({len(self)} detections, orig_shape={self.orig_shape})"


@dataclass
class Results:
    """Detections for one image (or video frame).

    ``orig_img`` is the image as read, BGR uint8; ``path`` where it came from (``image0`` for an
    in-memory image); ``frame`` its index in a video or stream; ``speed`` milliseconds spent in
    ``preprocess``, ``inference`` and ``postprocess``; ``names`` class id -> name.
    """

    orig_img: np.ndarray
    path: str
    names: dict[int, str]
    boxes: Boxes
    speed: dict[str, float] = field(default_factory=dict)
    frame: int | None = None

    @property
    def orig_shape(self) -> tuple[int, int]:
        return self.orig_img.shape[:2]

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: Any) -> Results:
        return replace(self, boxes=self.boxes[index])

    def numpy(self) -> Results:
        return replace(self, boxes=self.boxes.numpy())

    def torch(self, device: str | None = None) -> Results:
        return replace(self, boxes=self.boxes.torch(device))

    def label(self, class_id: int) -> str:
        """The class's name, or its id where the model records no names."""
        return self.names.get(class_id, str(class_id))

    def summary(self, normalize: bool = False, decimals: int = 5) -> list[dict]:
        """One dict per detection: ``name``, ``class``, ``confidence``, ``box`` {x1, y1, x2, y2}."""
        boxes = self.boxes.numpy()
        xyxy = boxes.xyxyn if normalize else boxes.xyxy
        rows = []
        for (x1, y1, x2, y2), conf, cls in zip(
            xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist(), strict=True
        ):
            rows.append(
                {
                    "name": self.label(int(cls)),
                    "class": int(cls),
                    "confidence": round(conf, decimals),
                    "box": {
                        k: round(v, decimals)
                        for k, v in zip(("x1", "y1", "x2", "y2"), (x1, y1, x2, y2), strict=True)
                    },
                }
            )
        return rows

    def to_json(self, normalize: bool = False, decimals: int = 5) -> str:
        return json.dumps(self.summary(normalize, decimals), indent=2)

    def to_df(self, normalize: bool = False, decimals: int = 5) -> Any:
        """The detections as a pandas DataFrame (pandas is optional)."""
        try:
            import pandas as pd
        except ImportError:
            raise NasquantError("to_df needs pandas: pip install pandas") from None
        return pd.json_normalize(self.summary(normalize, decimals))

    def to_dict(self) -> dict:
        """The record ``predictions.json`` holds for this image."""
        height, width = self.orig_shape
        record = {"source": self.path, "height": height, "width": width}
        if self.frame is not None:
            record["frame"] = self.frame
        record["detections"] = [
            {
                "box": [round(float(v), 2) for v in row["box"].values()],
                "score": row["confidence"],
                "class_id": row["class"],
                "class_name": row["name"],
            }
            for row in self.summary()
        ]
        return record

    def verbose(self) -> str:
        """``2 circles, 1 star`` (``no detections`` when empty)."""
        counts: dict[str, int] = {}
        for cls in self.boxes.numpy().cls.astype(int).tolist():
            counts[self.label(cls)] = counts.get(self.label(cls), 0) + 1
        return ", ".join(f"{n} {_plural(name, n)}" for name, n in counts.items()) or "no detections"

    def plot(self, conf: bool = True, labels: bool = True, line_width: int | None = None) -> np.ndarray:
        """A BGR copy of the image with the boxes drawn; the best-scoring labels end up on top."""
        return draw(
            self.orig_img, self.boxes.numpy(), self.names, conf=conf, labels=labels, line_width=line_width
        )

    def save(self, filename: str | os.PathLike | None = None) -> Path:
        """Write :meth:`plot` to ``filename`` (default ``results_<stem>.jpg``), atomically."""
        target = Path(filename) if filename else Path(f"results_{Path(self.path).stem}.jpg")
        ok, encoded = cv2.imencode(target.suffix or ".jpg", self.plot())
        if not ok:
            raise NasquantError(f"could not encode the annotated image as {target.suffix or '.jpg'}")
        with atomic_path(target) as tmp:
            tmp.write_bytes(encoded.tobytes())
        return target

    def show(self) -> None:
        """Open :meth:`plot` in a window (OpenCV's GUI; the headless build has none)."""
        try:
            cv2.imshow(self.path, self.plot())
            cv2.waitKey(0)
            cv2.destroyWindow(self.path)
        except cv2.error as exc:
            raise NasquantError(
                f"cannot open a window here ({str(exc).strip().splitlines()[-1]}): use .save() instead"
            ) from None

    def __repr__(self) -> str:
        return f"Results({self.path}: {self.verbose()})"


def _plural(name: str, count: int) -> str:
    if count == 1:
        return name
    return name + ("es" if name.endswith(("s", "x", "ch", "sh")) else "s")


def class_colour(class_id: int) -> tuple[int, int, int]:
    """A stable BGR colour per class."""
    # A fixed golden-ratio hue walk: distinct neighbours without a palette table.
    hue = int((class_id * 0.618033988749895 % 1.0) * 179)
    bgr = cv2.cvtColor(np.uint8([[[hue, 200, 255]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def draw(
    image_bgr: np.ndarray,
    boxes: Boxes,
    names: Mapping[int, str],
    *,
    conf: bool = True,
    labels: bool = True,
    line_width: int | None = None,
) -> np.ndarray:
    """A BGR copy of ``image_bgr`` with ``boxes`` and ``name score`` labels.

    Drawn worst score first, so on a crowded image the best detections' boxes and labels are the ones
    left readable; a label goes above its box, or inside it at the image's top edge.
    """
    canvas = image_bgr.copy()
    thickness = line_width or max(1, round(max(canvas.shape[:2]) / 400))
    scale = 0.4 * thickness
    for row in reversed(range(len(boxes))):
        cls = int(boxes.cls[row])
        colour = class_colour(cls)
        x1, y1, x2, y2 = (round(float(v)) for v in boxes.xyxy[row])
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thickness)
        if not labels:
            continue
        text = names.get(cls, str(cls)) + (f" {float(boxes.conf[row]):.2f}" if conf else "")
        (tw, th), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        top = y1 - th - baseline if y1 - th - baseline >= 0 else y1
        cv2.rectangle(canvas, (x1, top), (x1 + tw, top + th + baseline), colour, -1)
        cv2.putText(
            canvas, text, (x1, top + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness, cv2.LINE_AA
        )
    return canvas
