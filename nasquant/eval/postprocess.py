"""Score filtering, top-k and class-aware NMS for decoded YOLO-NAS outputs, without torchvision.

Semantics are super-gradients' ``PPYoloEPostPredictionCallback``: candidates above ``conf``, the
``top_k`` best kept, torchvision's ``batched_nms`` (greedy, IoU > ``iou`` suppresses), at most
``max_det`` detections per image in descending score order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

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
    keep = _greedy_nms(cand_boxes, classes, settings.iou, settings.max_det)
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
