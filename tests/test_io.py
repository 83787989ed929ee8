from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nasquant.errors import NasquantError
from nasquant.io import LOCK_NAME, atomic_path, remove_stale_parts, run_lock, write_json


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


def test_a_run_folder_lock_refuses_a_second_holder_and_names_the_first(tmp_path: Path) -> None:
    with run_lock(tmp_path / "run") as lock:
        assert lock.previous is None
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid()
        # Another open of the file is another lock owner, exactly as another process is.
        with (
            pytest.raises(
                NasquantError, match=rf"run is in use by another nasquant run \(pid {os.getpid()} on host "
            ),
            run_lock(tmp_path / "run"),
        ):
            pass
    assert not (tmp_path / "run" / LOCK_NAME).exists(), "released cleanly: no holder recorded"
    with run_lock(tmp_path / "run") as lock:
        assert lock.previous is None


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from nasquant.io import run_lock\n"
         f"with run_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = pytest.raises(NasquantError, match=rf"in use by another nasquant run \(pid {holder.pid} ")
        with refused, run_lock(tmp_path):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    # The kernel dropped the killed process's lock; its record stayed and says who stopped.
    with run_lock(tmp_path) as lock:
        assert lock.previous is not None and lock.previous["pid"] == holder.pid
