"""``data="coco8.yaml"``: Ultralytics' sample datasets, fetched into the cache from a local ``file://``
mirror (``$NASQUANT_MIRROR``), never from the internet."""

from __future__ import annotations

import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from nasquant.data import hub_datasets
from nasquant.data.coco_names import COCO_CLASSES
from nasquant.data.datasets import load_dataset
from nasquant.errors import NasquantError
from nasquant.eval.coco import evaluate_coco
from nasquant.weights.hub import DownloadFailed

# Ultralytics' layout: coco8/images/<split>/*.jpg with coco8/labels/<split>/*.txt (class cx cy w h).
LABELS = {
    "coco8/labels/val/b.txt": "2 0.5 0.5 0.5 0.5\n",  # a car in the middle of a 60x40 image
    "coco8/labels/val/c.txt": "0 0.25 0.25 0.5 0.5\n79 0.75 0.75 0.5 0.5\n",  # person, toothbrush
    "coco8/labels/train/a.txt": "1 0.5 0.5 1 1\n",
}
IMAGES = ("coco8/images/train/a.jpg", "coco8/images/val/b.jpg", "coco8/images/val/c.jpg")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache, an empty working directory (no local coco8.yaml) and a mirror holding nothing."""
    monkeypatch.setenv("NASQUANT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "served").mkdir()
    monkeypatch.setenv("NASQUANT_MIRROR", (tmp_path / "served").as_uri())
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "cache"


def _serve(tmp_path: Path, entries: dict[str, bytes | str], name: str = "coco8.zip") -> Path:
    with zipfile.ZipFile(tmp_path / "served" / name, "w") as archive:
        for entry, data in entries.items():
            archive.writestr(entry, data)
    return tmp_path / "served" / name


def _coco8_entries() -> dict[str, bytes | str]:
    ok, jpeg = cv2.imencode(".jpg", np.full((40, 60, 3), 90, dtype=np.uint8))
    assert ok
    return {**{image: jpeg.tobytes() for image in IMAGES}, **LABELS}


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_first_use_downloads_unpacks_and_loads_with_coco_ids(tmp_path: Path, cache: Path, capsys) -> None:
    _serve(tmp_path, _coco8_entries())
    dataset = load_dataset("coco8.yaml")

    root = cache / "datasets"
    assert _listing(root) == ["coco8", "coco8.yaml"]  # no archive, no temporary folder left
    assert dataset.image_paths == [root / "coco8/images/val/b.jpg", root / "coco8/images/val/c.jpg"]
    assert dataset.class_names == list(COCO_CLASSES) and dataset.category_ids == list(range(1, 81))
    gt = dataset.coco
    boxes = sorted((a["image_id"], a["category_id"], a["bbox"]) for a in gt["annotations"])
    assert boxes == [
        (1, 3, [15.0, 10.0, 30.0, 20.0]),
        (2, 1, [0.0, 0.0, 30.0, 20.0]),
        (2, 80, [30.0, 20.0, 30.0, 20.0]),
    ]
    assert gt["categories"][79] == {"id": 80, "name": "toothbrush", "supercategory": ""}
    # The ground truth is what pycocotools evaluates: a perfect prediction scores 1.0.
    perfect = [{**a, "score": 1.0} for a in gt["annotations"]]
    assert evaluate_coco(gt, perfect, dataset.class_names)["map50_95"] == pytest.approx(1.0)
    assert f"unpacked it into {root / 'coco8'}" in capsys.readouterr().err


def test_second_use_reads_the_cache_without_downloading(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(tmp_path, _coco8_entries())
    first = load_dataset("coco8.yaml")
    monkeypatch.setenv("NASQUANT_MIRROR", (tmp_path / "nowhere").as_uri())  # any download would fail now
    again = load_dataset("COCO8.yaml")
    assert again.image_paths == first.image_paths and again.coco == first.coco
    train = load_dataset("coco8.yaml", split="train")
    assert [p.name for p in train.image_paths] == ["a.jpg"] and train.coco["annotations"][0][
        "category_id"
    ] == 2


def test_a_local_file_wins_over_the_known_name(tmp_path: Path, cache: Path) -> None:
    (Path("images") / "val").mkdir(parents=True)
    cv2.imwrite("images/val/x.jpg", np.zeros((8, 8, 3), dtype=np.uint8))
    Path("coco8.yaml").write_text("path: .\nval: images/val\nnames: [mine]\n")
    assert load_dataset("coco8.yaml").class_names == ["mine"]
    assert not cache.exists()


def test_offline_is_one_line_naming_the_url_and_the_folder(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NASQUANT_MIRROR")

    def offline(url: str, dest: Path, **_) -> str:
        raise DownloadFailed("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(hub_datasets, "download", offline)
    with pytest.raises(NasquantError) as exc:
        load_dataset("coco128.yaml")
    message = str(exc.value)
    root = cache / "datasets"
    assert "\n" not in message and message.startswith("coco128.yaml: not cached and ")
    assert "https://github.com/ultralytics/assets/releases/download/v0.0.0/coco128.zip" in message
    assert "([Errno -3] Temporary failure in name resolution)" in message
    assert f"unzip it into {root}/ (giving {root / 'coco128' / 'images' / 'train2017'})" in message
    assert _listing(root) == []


def test_missing_archive_on_the_mirror(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(
        NasquantError, match=r"^coco8\.yaml: not cached and file://.*/served/coco8\.zip could"
    ):
        load_dataset("coco8.yaml")
    assert _listing(cache / "datasets") == []


@pytest.mark.parametrize("evil", ["../evil.txt", "coco8/../../evil.txt", "/tmp/evil.txt", "..\\evil.txt"])
def test_zip_slip_is_refused_and_leaves_nothing(tmp_path: Path, cache: Path, evil: str) -> None:
    _serve(tmp_path, {**_coco8_entries(), evil: "gotcha"})
    with pytest.raises(NasquantError) as exc:
        load_dataset("coco8.yaml")
    message = str(exc.value)
    assert "\n" not in message and f"refusing to unpack an archive whose entry {evil!r}" in message
    assert _listing(cache / "datasets") == []
    assert not (tmp_path / "evil.txt").exists() and not (cache / "evil.txt").exists()


@pytest.mark.parametrize(
    "entries, message",
    [
        (
            {"other/images/val/b.jpg": b""},
            r"coco8\.zip does not hold the folder coco8/ that coco8\.yaml expects",
        ),
        (None, r"coco8\.zip is not a valid zip archive"),
    ],
)
def test_wrong_archives_are_clear_errors(tmp_path: Path, cache: Path, entries, message: str) -> None:
    if entries is None:
        (tmp_path / "served" / "coco8.zip").write_bytes(b"<html>not a zip</html>")
    else:
        _serve(tmp_path, entries)
    with pytest.raises(NasquantError, match=message):
        load_dataset("coco8.yaml")
    assert _listing(cache / "datasets") == []


def test_the_table_matches_ultralytics_definitions() -> None:
    coco8, coco128 = hub_datasets.KNOWN_DATASETS["coco8.yaml"], hub_datasets.KNOWN_DATASETS["coco128.yaml"]
    assert coco8.url == "https://github.com/ultralytics/assets/releases/download/v0.0.0/coco8.zip"
    assert (coco8.folder, coco8.train, coco8.val) == ("coco8", "images/train", "images/val")
    assert (coco128.folder, coco128.val) == ("coco128", "images/train2017")
    assert coco8.names == coco128.names == COCO_CLASSES and len(COCO_CLASSES) == 80
    assert hub_datasets.known_dataset("data/coco8.yaml") is None  # only the bare name is Ultralytics'
