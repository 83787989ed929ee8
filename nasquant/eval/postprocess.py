"""Score filtering, top-k and class-aware NMS for decoded YOLO-NAS outputs, without torchvision.

Semantics are super-gradients' ``PPYoloEPostPredictionCallback``: candidates above ``conf``, the
``top_k`` best kept, torchvision's ``batched_nms`` (greedy, IoU > ``iou`` suppresses), at most
``max_det`` detections per image in descending score order. An end-to-end graph has the same steps
built in (:mod:`nasquant.export.nms`); :func:`detect` reads either kind of backend.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from nasquant.artifacts import KEY_NMS
from nasquant.errors import NasquantError
from nasquant.runtime.base import Backend
from nasquant.settings import NMSSettings


@dataclass
class Detections:
    """One image's detections, best first: ``boxes`` (K, 4) xyxy float32, ``scores`` (K,) float32,
    ``class_ids`` (K,) int64 contiguous class indices."""

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def postprocess(
    boxes: np.ndarray | torch.Tensor,
    scores: np.ndarray | torch.Tensor,
    settings: NMSSettings | None = None,
    **overrides: float | int | bool,
) -> list[Detections]:
    """Detections per image from ``boxes`` (B, A, 4) xyxy and class ``scores`` (B, A, C).

    ``overrides`` replace single fields of ``settings``, e.g. ``postprocess(b, s, conf=0.25)``.
    """
    settings = replace(settings or NMSSettings(), **overrides)
    boxes, scores = _as_float32(boxes), _as_float32(scores)
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or scores.ndim != 3 or boxes.shape[:2] != scores.shape[:2]:
        raise ValueError(
            f"expected boxes (B, A, 4) and scores (B, A, C), got {boxes.shape} and {scores.shape}"
        )
    return [_postprocess_image(b, s, settings) for b, s in zip(boxes, scores, strict=True)]


def detect(backend: Backend, images: np.ndarray, settings: NMSSettings) -> list[Detections]:
    """Detections per image of a preprocessed batch: ``backend``'s raw outputs post-processed with
    ``settings``, or an end-to-end graph's own (whose built-in settings :func:`resolve_nms` gives)."""
    return from_outputs(backend.run(images), settings, end_to_end=backend.end_to_end)


def from_outputs(
    outputs: tuple[np.ndarray, ...], settings: NMSSettings, *, end_to_end: bool
) -> list[Detections]:
    """Detections per image from a backend's outputs (:meth:`~nasquant.runtime.Backend.run`)."""
    return unpack_end_to_end(*outputs) if end_to_end else postprocess(*outputs, settings)


def unpack_end_to_end(
    num_dets: np.ndarray, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray
) -> list[Detections]:
    """Per-image :class:`Detections` from an end-to-end graph's padded outputs."""
    return [
        Detections(
            boxes=np.asarray(b[:n], dtype=np.float32),
            scores=np.asarray(s[:n], dtype=np.float32),
            class_ids=np.asarray(c[:n], dtype=np.int64),
        )
        for n, b, s, c in zip(num_dets[:, 0].astype(int), boxes, scores, classes, strict=True)
    ]


def built_in_nms(metadata: Mapping[str, str], where: object) -> NMSSettings:
    """The NMS settings an end-to-end graph records (:data:`~nasquant.artifacts.KEY_NMS`)."""
    recorded = metadata.get(KEY_NMS)
    if recorded is None:
        raise NasquantError(f"{where}: an end-to-end graph without its NMS settings ({KEY_NMS}) recorded")
    try:
        return NMSSettings(**json.loads(recorded))
    except (ValueError, TypeError) as exc:
        raise NasquantError(f"{where}: its recorded NMS settings are unreadable ({exc})") from None


def resolve_nms(backend: Backend, defaults: NMSSettings, **asked: float | int | None) -> NMSSettings:
    """The NMS settings a run of ``backend`` uses: ``defaults`` with the ``asked`` (non-None) fields
    replaced, or an end-to-end graph's built-in settings, which no asked value may contradict (its
    detections are already final)."""
    given = {name: value for name, value in asked.items() if value is not None}
    if not backend.end_to_end:
        return replace(defaults, **given)
    built = built_in_nms(backend.metadata, backend.path)
    differing = {name: value for name, value in given.items() if getattr(built, name) != value}
    if differing:
        have = ", ".join(
            f"{f.name}={getattr(built, f.name)}"
            for f in fields(built)
            if f.name not in ("multi_label", "agnostic")
        )
        want = ", ".join(f"{name}={value}" for name, value in differing.items())
        raise NasquantError(
            f"{backend.path} has NMS built in ({have}) and cannot apply {want}: "
            "use the raw graph, or export again with --nms and those settings"
        )
    return built


def _as_float32(array: np.ndarray | torch.Tensor) -> np.ndarray:
    # super-gradients casts to float32 before NMS (fp16 outputs included); so do we.
    if isinstance(array, torch.Tensor):
        array = array.detach().to("cpu", torch.float32).numpy()
    return np.asarray(array, dtype=np.float32)


def _postprocess_image(boxes: np.ndarray, scores: np.ndarray, settings: NMSSettings) -> Detections:
    if settings.multi_label:
        flat = scores.reshape(-1)
        pairs = np.flatnonzero(flat > settings.conf)  # row-major: (anchor, class) pairs in order
        order = _top_k(flat[pairs], settings.top_k)
        anchors, classes = np.divmod(pairs[order], scores.shape[1])
        cand_scores = flat[pairs[order]]
    else:
        best = scores.argmax(axis=1)
        best_scores = scores[np.arange(len(scores)), best]
        candidates = np.flatnonzero(best_scores >= settings.conf)
        anchors = candidates[_top_k(best_scores[candidates], settings.top_k)]
        classes, cand_scores = best[anchors], best_scores[anchors]
    cand_boxes = boxes[anchors]
    groups = np.zeros_like(classes) if settings.agnostic else classes
    keep = _greedy_nms(cand_boxes, groups, settings.iou, settings.max_det)
    return Detections(
        boxes=cand_boxes[keep],
        scores=cand_scores[keep],
        class_ids=classes[keep].astype(np.int64),
    )


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best scores, best first; equal scores keep their (anchor, class) order."""
    candidates = np.arange(len(scores))
    if len(scores) > k:
        # A partial selection first: sorting every candidate (often 10^5 at conf 0.01) dominates otherwise.
        candidates = np.argpartition(-scores, k - 1)[:k] if k > 0 else candidates[:0]
    return candidates[np.lexsort((candidates, -scores[candidates]))]


def _greedy_nms(boxes: np.ndarray, classes: np.ndarray, iou_threshold: float, limit: int) -> np.ndarray:
    """Indices kept by class-aware greedy NMS over ``boxes`` already sorted best first.

    Like torchvision's ``batched_nms`` (which super-gradients calls with <= 1000 boxes, i.e. on its
    coordinate-trick path), classes are separated by shifting each class's boxes by
    ``class * (max coordinate + 1)`` in float32, and IoU is computed the way its kernel does, so
    decisions match it bit for bit. Each kept box suppresses the later boxes it overlaps; the loop
    stops once ``limit`` boxes are kept, since later boxes cannot change the earlier ones.
    """
    keep: list[int] = []
    if len(boxes) == 0 or limit <= 0:
        return np.asarray(keep, dtype=np.int64)
    offsets = classes.astype(np.float32) * (boxes.max() + np.float32(1))
    x1, y1, x2, y2 = np.ascontiguousarray((boxes + offsets[:, None]).T)
    areas = (x2 - x1) * (y2 - y1)
    # torchvision compares the float32 IoU with the threshold as a double; so must we.
    threshold = np.float64(iou_threshold)
    suppressed = np.zeros(len(boxes), dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 for empty boxes: NaN never suppresses
        for i in range(len(boxes)):
            if suppressed[i]:
                continue
            keep.append(i)
            if len(keep) == limit:
                break
            rest = slice(i + 1, None)
            width = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), np.float32(0))
            height = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), np.float32(0))
            inter = width * height
            suppressed[rest] |= inter / (areas[i] + areas[rest] - inter) > threshold
    return np.asarray(keep, dtype=np.int64)
