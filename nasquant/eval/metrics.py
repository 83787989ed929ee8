"""What ``NAS.val`` returns, shaped like Ultralytics' ``DetMetrics``: ``.box.map``, ``.box.map50``,
``.box.map75``, ``.box.maps``, precision and recall per class, ``.results_dict`` (nasquant's flat
metrics), and the per-class table Ultralytics prints."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class BoxMetrics:
    """Box metrics as fractions; per-class arrays follow the class ids (``names``)."""

    map: float
    map50: float
    map75: float
    maps: np.ndarray
    """AP50-95 per class id; a class without ground truth gets ``map`` (Ultralytics' convention)."""
    ap50: np.ndarray
    p: np.ndarray
    """Precision per class at its best-F1 point (IoU 0.5); 0 without ground truth."""
    r: np.ndarray
    """Recall per class at the same point."""
    ap_class_index: np.ndarray
    """Ids of the classes with ground truth: the rows the table shows."""

    @property
    def mp(self) -> float:
        """Mean precision over the classes with ground truth."""
        return float(self.p[self.ap_class_index].mean()) if len(self.ap_class_index) else 0.0

    @property
    def mr(self) -> float:
        return float(self.r[self.ap_class_index].mean()) if len(self.ap_class_index) else 0.0

    def mean_results(self) -> list[float]:
        """``[mp, mr, map50, map]``."""
        return [self.mp, self.mr, self.map50, self.map]


class DetectionMetrics:
    """The result of a validation run. ``metrics["map50_95"]`` still reads :attr:`results_dict`."""

    def __init__(self, results: Mapping[str, Any]) -> None:
        self.results_dict: dict[str, Any] = dict(results)
        classes: Mapping[str, Mapping[str, Any]] = results["classes"]
        self.names: dict[int, str] = dict(enumerate(classes))
        overall = results["map50_95"] or 0.0

        def column(key: str, missing: float) -> np.ndarray:
            return np.array(
                [missing if row[key] is None else row[key] for row in classes.values()], np.float64
            )

        self.box = BoxMetrics(
            map=overall,
            map50=results["map50"] or 0.0,
            map75=results["map75"] or 0.0,
            maps=column("ap50_95", overall),
            ap50=column("ap50", 0.0),
            p=column("precision", 0.0),
            r=column("recall", 0.0),
            ap_class_index=np.array(
                [i for i, row in enumerate(classes.values()) if row["instances"]], dtype=np.int64
            ),
        )

    @property
    def maps(self) -> np.ndarray:
        return self.box.maps

    @property
    def fitness(self) -> float:
        """Ultralytics' model-selection score: 0.1 mAP50 + 0.9 mAP50-95."""
        return 0.1 * self.box.map50 + 0.9 * self.box.map

    def __getitem__(self, key: str) -> Any:
        return self.results_dict[key]

    def table(self) -> str:
        """The per-class table (``all`` first), as Ultralytics prints it after validation."""
        classes = self.results_dict["classes"]
        header = ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
        width = max(len("all"), *(len(name) for name in classes)) + 2
        rows = [
            ("all", self.results_dict["num_images"], sum(row["instances"] for row in classes.values()),
             self.box.mp, self.box.mr, self.box.map50, self.box.map)
        ]  # fmt: skip
        for index in self.box.ap_class_index:
            name = self.names[int(index)]
            row = classes[name]
            rows.append((name, row["images"], row["instances"], row["precision"], row["recall"], row["ap50"],
                         row["ap50_95"]))  # fmt: skip
        lines = [f"{header[0]:>{width}}" + "".join(f"{h:>11}" for h in header[1:])]
        for name, images, instances, *values in rows:
            lines.append(
                f"{name:>{width}}{images:>11}{instances:>11}" + "".join(f"{value:>11.3f}" for value in values)
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"DetectionMetrics(map50_95={self.box.map:.4f}, map50={self.box.map50:.4f}, "
            f"P={self.box.mp:.3f}, R={self.box.mr:.3f})"
        )
