from __future__ import annotations

import os
from pathlib import Path

import pytest

from nasquant.io import atomic_path, remove_stale_parts, write_json


def test_atomic_path_publishes_only_complete_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "artifact.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert not target.exists() and list(target.parent.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_json_handles_numpy_scalars_and_paths(tmp_path: Path) -> None:
    import numpy as np

    path = write_json(tmp_path / "x.json", {"a": np.float32(0.5), "p": tmp_path})
    assert path.read_text().startswith("{") and '"a": 0.5' in path.read_text()


def test_a_write_error_without_a_file_name_names_the_artifact(tmp_path: Path) -> None:
    # Libraries writing deep down (torch's exporter) report a full disk without saying which file.
    target = tmp_path / "model.onnx"
    with pytest.raises(OSError) as caught, atomic_path(target):
        raise OSError(28, "No space left on device")
    assert caught.value.filename == str(target) and "No space left on device while writing" in str(
        caught.value
    )
    assert list(tmp_path.iterdir()) == []


def test_stale_parts_are_removed_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / ".model.onnx.abc123.part").write_bytes(b"half")
    (tmp_path / "model.onnx").write_bytes(b"whole")
    (tmp_path / "notes.part").write_text("a user's file, not one of ours")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".x.part").write_text("another folder")
    assert [p.name for p in remove_stale_parts(tmp_path)] == [".model.onnx.abc123.part"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "notes.part", "sub"]
    assert remove_stale_parts(tmp_path / "absent") == []
