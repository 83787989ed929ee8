"""Results and Boxes: Ultralytics' accessors, drawing order, saving."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nasquant.errors import NasquantError
from nasquant.results import Boxes, Results, class_colour


def _results() -> Results:
    data = np.array([[10, 20, 50, 60, 0.9, 1], [12, 22, 48, 58, 0.4, 0], [0, 0, 10, 10, 0.3, 1]], np.float32)
    image = np.full((100, 200, 3), 255, np.uint8)
    return Results(image, "img.jpg", {0: "ring", 1: "cross"}, Boxes(data, image.shape[:2]))


def test_boxes_give_every_ultralytics_coordinate_form() -> None:
    boxes = _results().boxes
    np.testing.assert_array_equal(boxes.xyxy[0], [10, 20, 50, 60])
    np.testing.assert_array_equal(boxes.xywh[0], [30, 40, 40, 40])
    np.testing.assert_allclose(boxes.xyxyn[0], [0.05, 0.2, 0.25, 0.6])
    np.testing.assert_allclose(boxes.xywhn[0], [0.15, 0.4, 0.2, 0.4])
    assert boxes.conf.tolist() == pytest.approx([0.9, 0.4, 0.3]) and boxes.cls.tolist() == [1, 0, 1]
    assert len(boxes[1:]) == 2 and boxes[0].shape == (1, 6)
    tensors = boxes.torch()
    assert isinstance(tensors.xywh, torch.Tensor) and torch.equal(tensors.xywh, torch.from_numpy(boxes.xywh))
    assert torch.allclose(tensors.xyxyn, torch.from_numpy(boxes.xyxyn))
    np.testing.assert_array_equal(tensors.cpu().numpy().data, boxes.data)
    with pytest.raises(NasquantError, match=r"\(n, 6\)"):
        Boxes(np.zeros((2, 4), np.float32), (10, 10))


def test_results_summarise_and_index_like_ultralytics(tmp_path: Path) -> None:
    results = _results()
    assert len(results) == 3 and results.orig_shape == (100, 200)
    assert results.verbose() == "2 crosses, 1 ring" and len(results[:1]) == 1
    rows = json.loads(results.to_json())
    assert rows[0] == {
        "name": "cross",
        "class": 1,
        "confidence": 0.9,
        "box": {"x1": 10, "y1": 20, "x2": 50, "y2": 60},
    }
    assert json.loads(results.to_json(normalize=True))[0]["box"]["x2"] == 0.25
    record = results.to_dict()
    assert (record["source"], record["height"], record["width"], len(record["detections"])) == (
        "img.jpg",
        100,
        200,
        3,
    )
    saved = results.save(tmp_path / "out" / "annotated.png")
    assert saved.is_file() and not list(saved.parent.glob("*.part"))
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(NasquantError, match="pip install pandas"):
            results.to_df()
    else:
        assert len(results.to_df()) == 3


def test_plot_draws_the_best_detection_last_so_its_label_stays_readable() -> None:
    results = _results()
    canvas = results.plot()
    assert canvas.shape == results.orig_img.shape and (results.orig_img == 255).all(), "the original is kept"
    # boxes 0 (cross, 0.9) and 1 (ring, 0.4) put their labels at the same corner: the best one wins
    label_pixel = canvas[20 - 1, 10 + 1]
    assert tuple(int(v) for v in label_pixel) == class_colour(1)
    plain = results.plot(labels=False)
    assert tuple(int(v) for v in plain[20 - 1, 10 + 1]) == (255, 255, 255)
