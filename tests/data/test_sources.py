"""Every kind of ``source`` Ultralytics' predict takes, read as BGR frames."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from nasquant.data.sources import count_frames, image_files, iter_frames, media_files
from nasquant.errors import NasquantError
from tests.shared import shared_path


def _shapes_image(index: int = 0) -> Path:
    return sorted(shared_path("data", "shapes", "val", "images").glob("*.jpg"))[index]


def _even_sided(image: np.ndarray) -> np.ndarray:
    # MJPG encodes even widths and heights only
    return image[: image.shape[0] // 2 * 2, : image.shape[1] // 2 * 2]


def write_video(path: Path, frames: int = 5) -> Path:
    """A short MJPG video of one shapes image drifting right a pixel a frame."""
    image = _even_sided(cv2.imread(str(_shapes_image())))
    height, width = image.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (width, height))
    assert writer.isOpened(), "OpenCV here cannot write MJPG"
    for shift in range(frames):
        writer.write(np.roll(image, shift, axis=1))
    writer.release()
    return path


def test_a_video_is_read_frame_by_frame_and_counted(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.avi")
    frames = list(iter_frames(str(video)))
    assert count_frames(video) == len(frames) == 5
    assert [f.frame for f in frames] == list(range(5)) and {f.path for f in frames} == {str(video)}
    assert all(f.image.shape == _even_sided(cv2.imread(str(_shapes_image()))).shape for f in frames)


def test_a_folder_mixes_images_and_videos_and_ignores_other_files(tmp_path: Path) -> None:
    write_video(tmp_path / "b.avi", frames=2)
    (tmp_path / "a.jpg").write_bytes(_shapes_image().read_bytes())
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in media_files(tmp_path)] == ["a.jpg", "b.avi"]
    frames = list(iter_frames([tmp_path, str(tmp_path / "a.jpg")]))
    assert [(Path(f.path).name, f.frame) for f in frames] == [
        ("a.jpg", None),
        ("b.avi", 0),
        ("b.avi", 1),
        ("a.jpg", None),
    ]
    assert count_frames([tmp_path, str(tmp_path / "a.jpg")]) == 4
    assert image_files(tmp_path) == [tmp_path / "a.jpg"]  # calibration and validation folders: images only
    with pytest.raises(NasquantError, match="no images"):
        image_files(tmp_path / "b.avi")


def test_in_memory_images_are_converted_to_bgr() -> None:
    import PIL.Image

    bgr = cv2.imread(str(_shapes_image()))
    rgb = bgr[..., ::-1].copy()
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    frames = list(iter_frames([bgr, PIL.Image.fromarray(rgb), tensor, grey, np.dstack([bgr, bgr[..., :1]])]))
    assert [f.path for f in frames] == ["image0", "image1", "image2", "image3", "image4"]
    for frame in frames[:3] + frames[4:]:
        np.testing.assert_array_equal(frame.image, bgr)
    np.testing.assert_array_equal(frames[3].image, cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR))
    assert (
        len(list(iter_frames(torch.stack([tensor, tensor])))) == count_frames(torch.stack([tensor] * 2)) == 2
    )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (np.zeros((8, 8, 3), np.float32), "must be a uint8 image"),
        (np.zeros((8, 8, 5), np.uint8), r"HxWx3 BGR image .* got shape \(8, 8, 5\)"),
        (torch.full((3, 8, 8), 255.0), r"values in \[0, 1\] .* divide by 255"),
        (torch.zeros(8, 8), "RGB CHW or NCHW"),
        (3.5, "cannot read a source of type float"),
        ("no/such/file.jpg", "no such image, video, folder or pattern"),
        ("https://example.invalid/page.html", "does not name an image file"),
    ],
)
def test_unreadable_sources_are_one_clear_error(source: object, message: str) -> None:
    with pytest.raises(NasquantError, match=message):
        list(iter_frames(source))


@pytest.fixture
def image_server(tmp_path: Path) -> Iterator[tuple[str, http.server.HTTPServer]]:
    """A local HTTP server (no network leaves the machine) serving one shapes image."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "shape.jpg").write_bytes(_shapes_image().read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", server
    server.shutdown()  # a no-op when the test stopped it already
    server.server_close()


def test_an_image_url_is_downloaded_once_to_the_cache(
    image_server: tuple[str, http.server.HTTPServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NASQUANT_CACHE", str(tmp_path / "cache"))
    base, server = image_server
    url = f"{base}/shape.jpg"
    (frame,) = iter_frames(url)
    assert frame.path == url
    np.testing.assert_array_equal(frame.image, cv2.imread(str(_shapes_image())))
    assert len(list((tmp_path / "cache" / "sources").iterdir())) == 1
    with pytest.raises(
        NasquantError, match=r"could not download .*/other.jpg .*save the image and pass its path"
    ):
        list(iter_frames(f"{base}/other.jpg"))  # the server answers 404
    assert len(list((tmp_path / "cache" / "sources").iterdir())) == 1
    server.shutdown()
    server.server_close()  # offline now: the cached copy still serves
    (again,) = iter_frames(url)
    np.testing.assert_array_equal(again.image, frame.image)
