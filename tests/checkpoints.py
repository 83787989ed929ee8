"""YOLO-NAS weights made from a rule instead of a download: the golden README's deterministic weights
(the architecture oracle's inputs), and super-gradients-style ``.pth`` files of them for tests that need
a COCO checkpoint of the real layout (Deci's files are not reachable here)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

from nasquant.models import yolo_nas


def deterministic_tensor(key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The golden README's rule: one generator per key, seeded by its crc32; branches in this order."""
    rng = np.random.default_rng(zlib.crc32(key.encode("utf-8")))
    if key.endswith("running_var"):
        values = rng.uniform(0.5, 2.0, shape)
    elif key.endswith("running_mean"):
        values = rng.normal(0.0, 0.2, shape)
    elif len(shape) == 4:
        values = rng.normal(0.0, 0.9 / np.sqrt(shape[1] * shape[2] * shape[3]), shape)
    elif key.endswith("alpha"):
        values = rng.uniform(0.5, 1.5, shape)
    elif key.endswith("weight"):
        values = rng.uniform(0.45, 1.35, shape)
    else:  # bias and anything else share the same draw
        values = rng.normal(0.0, 0.1, shape)
    return values.astype(np.float32)


def deterministic_state_dict(variant: str) -> dict[str, torch.Tensor]:
    """The unfused 80-class ``variant`` with the golden rule's weights, in super-gradients' key order."""
    return {
        key: tensor
        if key.endswith("num_batches_tracked")
        else torch.from_numpy(deterministic_tensor(key, tuple(tensor.shape)))
        for key, tensor in yolo_nas(variant).state_dict().items()
    }


def write_sg_checkpoint(path: Path, variant: str) -> Path:
    """A ``.pth`` laid out like super-gradients' COCO checkpoints (``{"net": state_dict}``, torch zip)."""
    torch.save({"net": deterministic_state_dict(variant)}, path)
    return path
