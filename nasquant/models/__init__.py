"""YOLO-NAS networks (super-gradients-compatible) and their variant configs."""

from nasquant.models.yolo_nas import CONFIGS, VARIANTS, YoloNAS, YoloNASConfig, normalize_variant, yolo_nas

__all__ = ["CONFIGS", "VARIANTS", "YoloNAS", "YoloNASConfig", "normalize_variant", "yolo_nas"]
