from __future__ import annotations

import os
from pathlib import Path

import pytest

from nasquant.io import atomic_path, write_json


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
