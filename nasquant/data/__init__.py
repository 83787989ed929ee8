"""Datasets (COCO json, Ultralytics YAML, image folders) and the one preprocessing they all share."""

from nasquant.data.datasets import iter_batches, load_dataset
from nasquant.data.detection import Batch, DetectionDataset
from nasquant.data.preprocess import PROTOCOLS, ImageTransform, Preprocess, preprocess, read_image

__all__ = [
    "PROTOCOLS",
    "Batch",
    "DetectionDataset",
    "ImageTransform",
    "Preprocess",
    "iter_batches",
    "load_dataset",
    "preprocess",
    "read_image",
]
