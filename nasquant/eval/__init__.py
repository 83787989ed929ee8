"""Post-processing (score filter, top-k, class-aware NMS) and COCO metrics by pycocotools."""

from nasquant.eval.coco import STAT_NAMES, coco_detections, evaluate_coco
from nasquant.eval.postprocess import Detections, postprocess

__all__ = ["STAT_NAMES", "Detections", "coco_detections", "evaluate_coco", "postprocess"]
