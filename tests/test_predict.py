"""Prediction on videos and streams: frames in order, annotated video and records saved."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

from nasquant import NAS
from nasquant.predict import PREDICTIONS_JSON, next_free_folder
from tests.data.test_sources import write_video
from tests.shared import shared_path


@pytest.fixture(scope="module")
def nas() -> NAS:
    return NAS(shared_path("fixtures", "yolo_nas_s_shapes.pt")).fuse()


def test_a_video_streams_one_result_per_frame_and_saves_an_annotated_video(nas: NAS, tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.avi", frames=4)
    results = nas.predict(video, stream=True, save=True, save_dir=tmp_path / "out")
    first = next(results)
    assert first.frame == 0 and first.path == str(video) and len(first) > 0
    assert set(first.speed) == {"preprocess", "inference", "postprocess"}
    rest = list(results)
    assert [r.frame for r in rest] == [1, 2, 3]
    saved = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    try:
        assert int(saved.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    finally:
        saved.release()
    records = json.loads((tmp_path / "out" / PREDICTIONS_JSON).read_text())
    assert [r["frame"] for r in records] == [0, 1, 2, 3] and not list((tmp_path / "out").glob(".*"))


def test_leaving_a_stream_early_keeps_what_was_made(nas: NAS, tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.avi", frames=4)
    for result in nas.predict(video, stream=True, save_dir=tmp_path / "out"):
        if result.frame == 1:
            break
    records = json.loads((tmp_path / "out" / PREDICTIONS_JSON).read_text())
    assert [r["frame"] for r in records] == [0, 1] and (tmp_path / "out" / "clip.mp4").is_file()


def test_output_folders_increment_unless_exist_ok(tmp_path: Path) -> None:
    base = tmp_path / "predict"
    assert next_free_folder(base) == base
    base.mkdir()
    (tmp_path / "predict2").mkdir()
    assert next_free_folder(base) == tmp_path / "predict3"
    assert next_free_folder(base, exist_ok=True) == base
