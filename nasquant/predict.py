"""Prediction written once for every backend: frames in, :class:`~nasquant.results.Results` out, and
the writer that saves annotated images, annotated videos and ``predictions.json``."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np

from nasquant.data.preprocess import Preprocess, preprocess
from nasquant.data.sources import Frame
from nasquant.errors import NasquantError
from nasquant.eval.postprocess import from_outputs
from nasquant.io import write_json
from nasquant.results import Boxes, Results
from nasquant.runtime.base import Backend
from nasquant.settings import PREDICT_NMS, NMSSettings

#: what ``predict`` writes beside the annotated images: every image's detections
PREDICTIONS_JSON = "predictions.json"


def iter_results(
    backend: Backend,
    frames: Iterable[Frame],
    spec: Preprocess,
    names: dict[int, str],
    *,
    nms: NMSSettings = PREDICT_NMS,
) -> Iterator[Results]:
    """Detect objects in each frame, one image per forward pass, timing each step."""
    for frame in frames:
        started = time.perf_counter()
        tensor, transform = preprocess(cv2.cvtColor(frame.image, cv2.COLOR_BGR2RGB), spec)
        prepared = time.perf_counter()
        outputs = backend.run(tensor[None])
        inferred = time.perf_counter()
        (detections,) = from_outputs(outputs, nms, end_to_end=backend.end_to_end)
        data = np.concatenate(
            [
                transform.to_original(detections.boxes).astype(np.float32),
                detections.scores.astype(np.float32)[:, None],
                detections.class_ids.astype(np.float32)[:, None],
            ],
            axis=1,
        )
        finished = time.perf_counter()
        yield Results(
            orig_img=frame.image,
            path=frame.path,
            names=names,
            boxes=Boxes(data, frame.image.shape[:2]),
            speed={
                "preprocess": (prepared - started) * 1e3,
                "inference": (inferred - prepared) * 1e3,
                "postprocess": (finished - inferred) * 1e3,
            },
            frame=frame.frame,
        )


def next_free_folder(folder: str | os.PathLike, exist_ok: bool = False) -> Path:
    """``folder`` itself when it is free (or ``exist_ok``), else ``folder2``, ``folder3``...: a new
    prediction never mixes its files with an earlier one's."""
    folder = Path(folder)
    if exist_ok or not folder.exists():
        return folder
    number = 2
    while (candidate := folder.with_name(f"{folder.name}{number}")).exists():
        number += 1
    return candidate


class PredictionWriter:
    """Saves results into one folder as they come: ``<stem>.jpg`` per image, ``<stem>.mp4`` per video or
    stream, and ``predictions.json`` (every image's detections) when closed. Use it as a context manager;
    a video is renamed into place only when complete."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise NasquantError(f"output folder {self.folder} is a file")
        self._records: list[dict] = []
        self._names: dict[str, str] = {}  # source -> file stem, unique within the folder
        self._videos: dict[str, tuple[cv2.VideoWriter, Path, Path]] = {}

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        # A consumer leaving a stream=True loop early (GeneratorExit) chose to stop: keep what was made.
        self.close(complete=exc_type is None or issubclass(exc_type, GeneratorExit))

    def add(self, result: Results) -> None:
        self._refuse_overwriting(result.path)
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = self._stem(result.path)
        if result.frame is None:
            result.save(self.folder / f"{stem}.jpg")
        else:
            self._video_frame(stem, result)
        self._records.append(result.to_dict())

    def close(self, complete: bool = True) -> None:
        for writer, tmp, final in self._videos.values():
            writer.release()
            if complete:
                os.replace(tmp, final)
            else:
                tmp.unlink(missing_ok=True)
        self._videos.clear()
        if complete and self._records:
            write_json(self.folder / PREDICTIONS_JSON, self._records)

    def _refuse_overwriting(self, source: str) -> None:
        # An annotated re-encode written over its own input would destroy the user's image.
        if Path(source).is_file() and Path(source).resolve().parent == self.folder.resolve():
            raise NasquantError(
                f"output folder {self.folder} holds the input {source}: annotated images would replace "
                "inputs; choose another output folder"
            )

    def _stem(self, source: str) -> str:
        if source not in self._names:
            stem = Path(source).stem or "image"
            name, number = stem, 1
            while name in self._names.values():  # inputs named alike in different folders
                name, number = f"{stem}_{number}", number + 1
            self._names[source] = name
        return self._names[source]

    def _video_frame(self, stem: str, result: Results) -> None:
        if result.path not in self._videos:
            height, width = result.orig_shape
            # A temporary name that still ends in .mp4: OpenCV picks the container from the suffix.
            final = self.folder / f"{stem}.mp4"
            tmp = self.folder / f".{stem}.part.mp4"
            fps = _frame_rate(result.path)
            writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
            if not writer.isOpened():
                raise NasquantError(f"cannot write video {final} (OpenCV has no mp4v encoder here)")
            self._videos[result.path] = (writer, tmp, final)
        self._videos[result.path][0].write(result.plot())


def _frame_rate(source: str) -> float:
    """The source video's frame rate; 30 for a live stream (reopening a camera would grab it again)."""
    if source.isdigit() or not Path(source).is_file():
        return 30.0
    capture = cv2.VideoCapture(source)
    try:
        fps = capture.get(cv2.CAP_PROP_FPS)
    finally:
        capture.release()
    return fps if fps and fps > 0 else 30.0
