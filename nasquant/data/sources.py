"""Turn what a user passes as ``source`` into images: the inputs Ultralytics' ``predict`` takes.

A path (image, video, folder of either, glob), an ``http(s)`` image URL (downloaded once to the cache,
like weights), a stream URL (``rtsp://``...) or a webcam index, a numpy array (**BGR**, what
``cv2.imread`` returns), a PIL image (RGB), a torch tensor (RGB, 0-1, CHW or NCHW), or a list of any.
Every image comes out as a :class:`Frame` holding BGR uint8 pixels.
"""

from __future__ import annotations

import glob
import hashlib
import os
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from nasquant.errors import NasquantError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})
#: URL schemes OpenCV reads as live streams
STREAM_SCHEMES = ("rtsp", "rtmp", "tcp", "udp")


@dataclass(frozen=True)
class Frame:
    """One image to run on: ``path`` names where it came from (a file, ``image0`` for an array, a video
    file or stream with ``frame`` its index in it)."""

    path: str
    image: np.ndarray
    frame: int | None = None


def image_files(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Image paths from a file, a folder (sorted, non-recursive), a glob pattern, or a list of those."""
    if not isinstance(source, str | os.PathLike):
        return [path for item in source for path in image_files(item)]
    images = [path for path in media_files(source) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not images:  # only videos there: predict reads them, calibration and validation do not
        raise NasquantError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {os.fspath(source)}")
    return images


def media_files(source: str | os.PathLike) -> list[Path]:
    """Image and video paths from a file, a folder (sorted, non-recursive) or a glob pattern."""
    text = os.fspath(source)
    path = Path(text)
    known = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in known)
        if not found:
            raise NasquantError(f"no images or videos ({', '.join(sorted(known))}) in folder {path}")
        return found
    if path.is_file():
        if path.suffix.lower() not in known:
            raise NasquantError(
                f"{path} is not an image or video file (expected one of {', '.join(sorted(known))})"
            )
        return [path]
    if glob.has_magic(text):
        found = sorted(Path(p) for p in glob.glob(text) if Path(p).suffix.lower() in known)
        if not found:
            raise NasquantError(f"no images or videos match {text}")
        return found
    raise NasquantError(f"no such image, video, folder or pattern: {text}")


def read_image_bgr(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file as BGR uint8 HxWx3 (OpenCV, EXIF orientation applied)."""
    path = Path(path)
    if not path.is_file():
        raise NasquantError(f"image not found: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise NasquantError(f"cannot decode image {path} (corrupt or unsupported format)")
    return image


def iter_frames(source: Any) -> Iterator[Frame]:
    """Every image of ``source`` in order, read lazily (a video or stream frame by frame)."""
    counter = iter(range(1 << 62))  # names image0, image1... for in-memory inputs, across a list
    yield from _frames(source, counter)


def count_frames(source: Any) -> int | None:
    """How many images :func:`iter_frames` will give, for a progress bar; None when unknown (a stream)."""
    if isinstance(source, list | tuple):
        counts = [count_frames(item) for item in source]
        return None if None in counts else sum(counts)  # type: ignore[arg-type]
    if _is_tensor(source):
        return 1 if source.ndim == 3 else int(source.shape[0])
    if _stream_target(source) is not None:
        return None
    if isinstance(source, np.ndarray) or _is_pil(source) or _is_url(source):
        return 1
    if not isinstance(source, str | os.PathLike):
        return None
    total = 0
    for path in media_files(source):
        frames = _video_length(path) if path.suffix.lower() in VIDEO_SUFFIXES else 1
        if frames is None:
            return None
        total += frames
    return total


def _video_length(path: Path) -> int | None:
    capture = cv2.VideoCapture(str(path))
    try:
        frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        capture.release()
    return frames if frames > 0 else None


def _frames(source: Any, counter: Iterator[int]) -> Iterator[Frame]:
    if isinstance(source, list | tuple):
        for item in source:
            yield from _frames(item, counter)
    elif isinstance(source, np.ndarray):
        yield Frame(f"image{next(counter)}", _bgr_array(source))
    elif _is_pil(source):
        yield Frame(getattr(source, "filename", "") or f"image{next(counter)}", _pil_to_bgr(source))
    elif _is_tensor(source):
        for image in _tensor_to_bgr(source):
            yield Frame(f"image{next(counter)}", image)
    elif (target := _stream_target(source)) is not None:
        yield from _video(target, str(source))
    elif isinstance(source, str) and _is_url(source):
        path = _downloaded(source)
        yield Frame(source, read_image_bgr(path))
    elif isinstance(source, str | os.PathLike):
        for path in media_files(source):
            if path.suffix.lower() in VIDEO_SUFFIXES:
                yield from _video(str(path), str(path))
            else:
                yield Frame(str(path), read_image_bgr(path))
    else:
        raise NasquantError(
            f"cannot read a source of type {type(source).__name__}: give a path, folder, glob, URL, video, "
            "webcam index, numpy BGR array, PIL image, torch tensor, or a list of those"
        )


def _bgr_array(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise NasquantError(
            f"array input must be a uint8 image (BGR, as cv2.imread gives), got {array.dtype}"
        )
    if array.ndim == 2:
        return cv2.cvtColor(array, cv2.COLOR_GRAY2BGR)
    if array.ndim == 3 and array.shape[2] == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2BGR)
    if array.ndim != 3 or array.shape[2] != 3:
        raise NasquantError(f"array input must be an HxWx3 BGR image (or HxW grey), got shape {array.shape}")
    return np.ascontiguousarray(array)


def _is_pil(source: Any) -> bool:
    return type(source).__module__.startswith("PIL.") and hasattr(source, "convert")


def _pil_to_bgr(image: Any) -> np.ndarray:
    return cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)


def _is_tensor(source: Any) -> bool:
    return type(source).__module__.startswith("torch") and hasattr(source, "detach")


def _tensor_to_bgr(tensor: Any) -> list[np.ndarray]:
    """RGB 0-1 float tensors, CHW or NCHW (Ultralytics' convention), as BGR uint8 images."""
    array = tensor.detach().to("cpu").float().numpy()
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1] != 3:
        raise NasquantError(
            f"tensor input must be RGB CHW or NCHW with 3 channels, got shape {tuple(tensor.shape)}"
        )
    if array.size and (array.min() < 0 or array.max() > 1):
        raise NasquantError(
            f"tensor input must hold values in [0, 1] (got {array.min():.3g}..{array.max():.3g}): divide by 255"
        )
    images = np.round(array * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return [cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR) for image in images]


def _stream_target(source: Any) -> str | int | None:
    """What OpenCV should open for a webcam index (``0`` or ``"0"``) or a stream URL; else None."""
    if isinstance(source, int) and not isinstance(source, bool):
        return source
    if isinstance(source, str):
        if source.isdigit():
            return int(source)
        scheme = urllib.parse.urlsplit(source).scheme.lower()
        if scheme in STREAM_SCHEMES:
            return source
        if (
            scheme in ("http", "https")
            and Path(urllib.parse.urlsplit(source).path).suffix.lower() in VIDEO_SUFFIXES
        ):
            return source
    return None


def _is_url(source: Any) -> bool:
    return isinstance(source, str) and urllib.parse.urlsplit(source).scheme.lower() in ("http", "https")


def _video(target: str | int, name: str) -> Iterator[Frame]:
    capture = cv2.VideoCapture(target)
    try:
        if not capture.isOpened():
            raise NasquantError(f"cannot open video or stream {name}")
        index = 0
        while True:
            ok, image = capture.read()
            if not ok:
                break
            yield Frame(name, image, index)
            index += 1
    finally:
        capture.release()


def _downloaded(url: str) -> Path:
    """An image URL's local copy in the cache (``<cache>/sources/``), downloaded on first use."""
    from nasquant.weights.hub import DownloadFailed, cache_dir_default, download

    name = Path(urllib.parse.urlsplit(url).path).name
    if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
        raise NasquantError(f"{url} does not name an image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
    # the URL's hash in the name: two sites' "image.jpg" are two files
    dest = cache_dir_default() / "sources" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"
    if not dest.is_file():
        try:
            download(url, dest, progress=False)
        except DownloadFailed as exc:
            raise NasquantError(
                f"could not download {url} ({exc}): save the image and pass its path"
            ) from None
    return dest
