"""YOLO-NAS checkpoints: find the file (path, folder, URL, alias), read it safely, describe it."""

from nasquant.weights.checkpoint import Checkpoint, infer_variant, load_checkpoint
from nasquant.weights.hub import resolve_source

__all__ = ["Checkpoint", "infer_variant", "load_checkpoint", "resolve_source"]
