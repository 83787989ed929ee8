from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from nasquant.errors import NasquantError
from nasquant.eval.postprocess import postprocess
from nasquant.settings import NMSSettings


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _reference(boxes, scores, conf, iou, top_k, max_det, multi_label=True):
    """Plain-python super-gradients semantics: filter, top-k, greedy NMS per class, merge, cap."""
    candidates = []  # (score, anchor, class) in (anchor, class) order
    for a in range(len(boxes)):
        if multi_label:
            candidates += [(float(s), a, c) for c, s in enumerate(scores[a]) if s > conf]
        else:
            c = int(np.argmax(scores[a]))
            if scores[a][c] >= conf:
                candidates.append((float(scores[a][c]), a, c))
    ranked = sorted(range(len(candidates)), key=lambda i: (-candidates[i][0], i))[:top_k]
    kept = []
    for cls in {candidates[i][2] for i in ranked}:
        chosen = []
        for i in (i for i in ranked if candidates[i][2] == cls):
            box = [float(v) for v in boxes[candidates[i][1]]]
            if all(_iou(box, other) <= iou for _, other in chosen):
                chosen.append((i, box))
        kept += [i for i, _ in chosen]
    kept = sorted(kept, key=lambda i: (-candidates[i][0], i))[:max_det]
    return [(candidates[i][1], candidates[i][2], candidates[i][0]) for i in kept]


def _clustered_boxes(rng, n, clusters=25, extent=600):
    """Integer boxes in overlapping clusters: NMS has real work, and float32 IoU is exact enough
    that no pair sits within rounding of the threshold (integer areas keep ratios apart)."""
    centres = rng.integers(50, extent - 50, (clusters, 2))
    centre = centres[rng.integers(0, clusters, n)] + rng.integers(-12, 13, (n, 2))
    half = rng.integers(10, 60, (n, 2))
    return np.concatenate([centre - half, centre + half], axis=1).astype(np.float32)


@pytest.mark.parametrize("multi_label", [True, False])
@pytest.mark.parametrize(
    "settings",
    [
        NMSSettings(),
        NMSSettings(top_k=2000, max_det=2000),
        NMSSettings(conf=0.3, iou=0.5, top_k=150, max_det=60),
        NMSSettings(conf=0.05, iou=0.3, top_k=1000, max_det=1000),
    ],
)
def test_matches_reference_on_random_boxes(settings, multi_label):
    rng = np.random.default_rng(7)
    batch, anchors, classes = 3, 400, 4
    # Distinct scores, so that the ranking (and with it the expected output) is unique.
    boxes = np.stack([_clustered_boxes(rng, anchors) for _ in range(batch)])
    scores = np.stack(
        [rng.permutation(anchors * classes).reshape(anchors, classes) for _ in range(batch)]
    ).astype(np.float32) / np.float32(anchors * classes)
    settings = replace(settings, multi_label=multi_label)
    results = postprocess(boxes, scores, settings)
    assert len(results) == batch
    for b in range(batch):
        expected = _reference(
            boxes[b], scores[b], settings.conf, settings.iou, settings.top_k, settings.max_det, multi_label
        )
        got = results[b]
        assert got.boxes.dtype == np.float32 and got.scores.dtype == np.float32
        assert got.class_ids.dtype == np.int64 and got.boxes.shape == (len(got), 4)
        np.testing.assert_array_equal(got.scores, [s for _, _, s in expected])
        np.testing.assert_array_equal(got.class_ids, [c for _, c, _ in expected])
        np.testing.assert_array_equal(got.boxes, boxes[b][[a for a, _, _ in expected]].reshape(-1, 4))
        assert np.all(np.diff(got.scores) <= 0)
    assert any(len(r) > 0 for r in results)


def test_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(3)
    boxes = _clustered_boxes(rng, 300)[None]
    scores = rng.uniform(0, 1, (1, 300, 5)).astype(np.float32)
    a = postprocess(boxes, scores)[0]
    b = postprocess(torch.from_numpy(boxes).half().float(), torch.from_numpy(scores))[0]
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.class_ids, b.class_ids)


def test_keyword_overrides_equal_settings():
    rng = np.random.default_rng(4)
    boxes, scores = _clustered_boxes(rng, 200)[None], rng.uniform(0, 1, (1, 200, 3)).astype(np.float32)
    a = postprocess(boxes, scores, conf=0.5, max_det=20)[0]
    b = postprocess(boxes, scores, NMSSettings(conf=0.5, max_det=20))[0]
    np.testing.assert_array_equal(a.scores, b.scores)
    assert len(a) == 20


# --------------------------------------------------------------------------------------------------
# edge cases


def _one_image(boxes, scores):
    return np.asarray(boxes, dtype=np.float32)[None], np.asarray(scores, dtype=np.float32)[None]


def test_no_candidates_gives_empty_arrays():
    boxes, scores = _one_image([[0, 0, 10, 10]], [[0.001, 0.002]])
    (dets,) = postprocess(boxes, scores)
    assert len(dets) == 0
    assert dets.boxes.shape == (0, 4) and dets.boxes.dtype == np.float32
    assert dets.scores.shape == (0,) and dets.class_ids.shape == (0,) and dets.class_ids.dtype == np.int64
    no_anchors = postprocess(np.zeros((2, 0, 4)), np.zeros((2, 0, 3)))
    assert [len(d) for d in no_anchors] == [0, 0]


def test_conf_is_strict_for_multi_label_and_inclusive_for_single_label():
    boxes, scores = _one_image([[0, 0, 10, 10]], [[0.25, 0.1]])
    assert len(postprocess(boxes, scores, conf=0.25)[0]) == 0
    (single,) = postprocess(boxes, scores, conf=0.25, multi_label=False)
    assert single.class_ids.tolist() == [0] and single.scores.tolist() == [0.25]


def test_multi_label_gives_one_detection_per_class_above_conf():
    boxes, scores = _one_image([[0, 0, 10, 10]], [[0.9, 0.5, 0.005]])
    (dets,) = postprocess(boxes, scores)
    assert dets.class_ids.tolist() == [0, 1]
    (single,) = postprocess(boxes, scores, multi_label=False)
    assert single.class_ids.tolist() == [0]


def test_same_class_duplicates_are_all_suppressed_but_the_best():
    boxes, scores = _one_image([[0, 0, 10, 10]] * 5, [[0.2], [0.9], [0.5], [0.3], [0.4]])
    (dets,) = postprocess(boxes, scores)
    assert dets.scores.tolist() == [pytest.approx(0.9)]


def test_equal_scores_keep_the_first_anchor():
    boxes, scores = _one_image([[0, 0, 10, 10], [0.5, 0, 10.5, 10], [1, 0, 11, 10]], [[0.5]] * 3)
    (dets,) = postprocess(boxes, scores)
    assert dets.boxes.tolist() == [[0, 0, 10, 10]]


def test_overlapping_boxes_of_different_classes_are_both_kept():
    boxes, scores = _one_image([[0, 0, 10, 10], [0, 0, 10, 10]], [[0.9, 0.0], [0.0, 0.8]])
    (dets,) = postprocess(boxes, scores)
    assert dets.class_ids.tolist() == [0, 1]


def test_iou_must_exceed_the_threshold_to_suppress():
    # IoU of these two is exactly 0.5.
    boxes, scores = _one_image([[0, 0, 10, 10], [0, 0, 10, 5]], [[0.9], [0.8]])
    assert len(postprocess(boxes, scores, iou=0.5)[0]) == 2
    assert len(postprocess(boxes, scores, iou=0.49)[0]) == 1


def test_suppressed_boxes_do_not_suppress():
    # B overlaps A (suppressed); C overlaps B but not A, so C survives: greedy, not clustering.
    boxes, scores = _one_image([[0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]], [[0.9], [0.8], [0.7]])
    (dets,) = postprocess(boxes, scores, iou=0.3)
    assert dets.boxes[:, 0].tolist() == [0, 6]


def test_max_det_and_top_k_caps():
    xs = np.arange(50, dtype=np.float32) * 20
    boxes = np.stack([xs, np.zeros(50), xs + 10, np.full(50, 10)], axis=1)  # disjoint
    scores = np.linspace(0.1, 0.9, 50, dtype=np.float32)[:, None]
    (capped,) = postprocess(boxes[None], scores[None], max_det=7)
    np.testing.assert_array_equal(capped.scores, scores[::-1, 0][:7])
    (top,) = postprocess(boxes[None], scores[None], top_k=3)
    np.testing.assert_array_equal(top.scores, scores[::-1, 0][:3])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("conf", 1.5),
        ("conf", 0),
        ("conf", float("nan")),
        ("iou", 0),
        ("iou", 2.0),
        ("top_k", -1),
        ("top_k", 0),
        ("max_det", 0),
        ("max_det", 2.5),
        ("max_det", True),
    ],
)
def test_nonsense_settings_are_refused_where_they_are_made(field: str, value: object) -> None:
    with pytest.raises(NasquantError, match=rf"^{field} must be"):
        NMSSettings(**{field: value})


def test_degenerate_boxes_do_not_crash_or_suppress():
    boxes, scores = _one_image([[5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 10, 10]], [[0.9], [0.8], [0.7]])
    (dets,) = postprocess(boxes, scores)
    assert len(dets) == 3


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="expected boxes"):
        postprocess(np.zeros((1, 5, 4)), np.zeros((1, 6, 2)))
