"""Aliases, URLs and the download cache, against a local HTTP server (never the internet)."""

from __future__ import annotations

import hashlib
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nasquant.errors import NasquantError
from nasquant.weights import hub, load_checkpoint, resolve_source

PAYLOAD = b"not really weights, but resolve_source does not look inside\n" * 100


@dataclass
class LocalServer:
    root: Path
    url: str
    requests: list[str] = field(default_factory=list)
    short: set[str] = field(default_factory=set)  # paths answered with fewer bytes than promised


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, *args, server_state: LocalServer, **kwargs) -> None:
        self.state = server_state
        super().__init__(*args, directory=str(server_state.root), **kwargs)

    def do_GET(self) -> None:
        self.state.requests.append(self.path)
        if self.path in self.state.short:
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalServer]:
    root = tmp_path / "served"
    root.mkdir()
    (root / "small.pth").write_bytes(PAYLOAD)
    state = LocalServer(root=root, url="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, server_state=state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=partial(httpd.serve_forever, poll_interval=0.02), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _dead_url(name: str) -> str:
    """A URL on a local port nobody listens on: connection refused, instantly."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_url_download_then_cache_reuse(server: LocalServer, cache: Path, capsys) -> None:
    url = f"{server.url}/small.pth"
    path = resolve_source(url, cache_dir=cache, progress=False)
    assert path == cache / "small.pth" and path.read_bytes() == PAYLOAD
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    assert f"sha256 {digest}" in capsys.readouterr().err  # the user learns what to pin

    again = resolve_source(url, cache_dir=cache, sha256=digest, progress=False)
    assert again == path and server.requests == ["/small.pth"]  # no second request
    assert _files(cache) == ["small.pth"]


def test_cache_dir_from_environment(server: LocalServer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NASQUANT_CACHE", str(tmp_path / "env-cache"))
    assert resolve_source(f"{server.url}/small.pth", progress=False) == tmp_path / "env-cache" / "small.pth"


def test_pinned_sha256_mismatch_leaves_no_file(server: LocalServer, cache: Path) -> None:
    wrong = "0" * 64
    actual = hashlib.sha256(PAYLOAD).hexdigest()
    with pytest.raises(NasquantError) as exc:
        resolve_source(f"{server.url}/small.pth", cache_dir=cache, sha256=wrong, progress=False)
    message = str(exc.value)
    assert f"sha256 {actual}, but {wrong} was pinned" in message and "\n" not in message
    assert _files(cache) == []  # neither the file nor a .part


def test_cached_file_that_fails_the_pin_is_downloaded_again(server: LocalServer, cache: Path) -> None:
    cache.mkdir()
    (cache / "small.pth").write_bytes(b"stale")
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    path = resolve_source(f"{server.url}/small.pth", cache_dir=cache, sha256=digest, progress=False)
    assert path.read_bytes() == PAYLOAD and server.requests == ["/small.pth"]


def test_alias_falls_back_to_the_second_mirror(server: LocalServer, cache: Path, monkeypatch) -> None:
    monkeypatch.setitem(hub.MIRRORS, "yolo_nas_s", (f"{server.url}/gone.pth", f"{server.url}/small.pth"))
    monkeypatch.delenv("NASQUANT_MIRROR")
    assert resolve_source("yolo_nas_s", cache_dir=cache, progress=False) == cache / "small.pth"
    assert server.requests == ["/gone.pth", "/small.pth"]
    assert _files(cache) == ["small.pth"]


def test_alias_through_nasquant_mirror_loads_end_to_end(
    server: LocalServer, cache: Path, shapes_safetensors: Path, monkeypatch
) -> None:
    # An internal mirror serves the public file names; here the "S3" name holds the shapes fixture.
    shutil.copy(shapes_safetensors, server.root / "yolo_nas_s_coco.pth")
    monkeypatch.setenv("NASQUANT_MIRROR", f"{server.url}/")
    checkpoint = load_checkpoint("yolo_nas_s", cache_dir=cache, progress=False)
    assert (checkpoint.variant, checkpoint.num_classes) == ("yolo_nas_s", 6)
    assert checkpoint.path == cache / "yolo_nas_s_coco.pth"
    # Ultralytics' file name is the same alias: the cached copy, no second request.
    for name in ("YOLO-NAS-S", "yolo_nas_s.pt"):
        assert load_checkpoint(name, cache_dir=cache, progress=False).path == checkpoint.path
    assert server.requests == ["/yolo_nas_s_coco.pth"]


@pytest.mark.parametrize("name, alias", [("yolo_nas_s.pt", "yolo_nas_s"), ("YOLO-NAS-L.PT", "yolo_nas_l")])
def test_ultralytics_file_name_offline_explains_the_download(cache: Path, name: str, alias: str) -> None:
    messages = []
    for source in (name, alias):
        with pytest.raises(NasquantError) as exc:
            resolve_source(source, cache_dir=cache, progress=False)
        messages.append(str(exc.value))
    assert messages[0] == messages[1]  # the conftest's mirror is a closed port
    assert messages[0].startswith(f"could not download {alias}: ") and "\n" not in messages[0]
    assert f"put it at {cache / f'{alias}_coco.pth'} or {cache / f'{alias}.pt'}" in messages[0]


def test_ultralytics_file_name_finds_the_cached_pt(cache: Path) -> None:
    cache.mkdir()
    (cache / "yolo_nas_m.pt").write_bytes(PAYLOAD)  # what Ultralytics' mirror gives
    assert resolve_source("yolo_nas_m.pt", cache_dir=cache) == cache / "yolo_nas_m.pt"


def test_other_pt_names_are_still_missing_files(cache: Path) -> None:
    with pytest.raises(NasquantError, match=r"^no such checkpoint file: yolo_nas_x\.pt \("):
        resolve_source("yolo_nas_x.pt", cache_dir=cache)
    assert hub.checkpoint_alias("my_yolo_nas_s.pt") is None and hub.checkpoint_alias("yolo_nas_s.pth") is None


def test_every_mirror_down_is_one_line_naming_each_url(server: LocalServer, cache: Path, monkeypatch) -> None:
    urls = (f"{server.url}/missing.pth", _dead_url("yolo_nas_m.pt"))
    monkeypatch.setitem(hub.MIRRORS, "yolo_nas_m", urls)
    monkeypatch.delenv("NASQUANT_MIRROR")
    with pytest.raises(NasquantError) as exc:
        load_checkpoint("yolo_nas_m", cache_dir=cache, progress=False)
    message = str(exc.value)
    assert "\n" not in message and message.startswith("could not download yolo_nas_m: ")
    assert f"{urls[0]} (HTTP 404" in message
    assert f"{urls[1]} (" in message and "refused" in message.lower()
    assert str(cache / "missing.pth") in message and str(cache / "yolo_nas_m.pt") in message
    assert _files(cache) == []


def test_short_download_leaves_no_file(server: LocalServer, cache: Path) -> None:
    server.short.add("/cut.pth")
    with pytest.raises(NasquantError, match=r"cut\.pth \(connection closed after 10 of 100000 bytes\)"):
        resolve_source(f"{server.url}/cut.pth", cache_dir=cache, progress=False)
    assert _files(cache) == []


def test_known_size_is_enforced(server: LocalServer, cache: Path, monkeypatch) -> None:
    url = f"{server.url}/small.pth"
    monkeypatch.setitem(hub.KNOWN_FILES, url, (len(PAYLOAD) + 1, "f" * 64))
    with pytest.raises(NasquantError, match=rf"it offers {len(PAYLOAD)} bytes, expected {len(PAYLOAD) + 1}"):
        resolve_source(url, cache_dir=cache, progress=False)
    assert _files(cache) == []


def test_known_but_unverified_hash_only_warns(server: LocalServer, cache: Path, monkeypatch, capsys) -> None:
    url = f"{server.url}/small.pth"
    monkeypatch.setitem(hub.KNOWN_FILES, url, (len(PAYLOAD), "f" * 64))
    assert resolve_source(url, cache_dir=cache, progress=False).read_bytes() == PAYLOAD
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"unverified sha256 {'f' * 64}" in err


def test_default_mirrors_prefer_the_state_dict_host() -> None:
    for variant, urls in hub.MIRRORS.items():
        assert urls[0] == f"https://sg-hub-nv.s3.amazonaws.com/models/{variant}_coco.pth"
        assert urls[1] == f"https://github.com/ultralytics/assets/releases/download/v8.1.0/{variant}.pt"
    size, digest = hub.KNOWN_FILES["https://sg-hub-nv.s3.amazonaws.com/models/yolo_nas_s_coco.pth"]
    assert size == 76_688_335 and digest.startswith("c1b1d914")


def test_a_local_path_wins_over_the_alias(tmp_path: Path, shapes_safetensors: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("yolo_nas_s").mkdir()
    shutil.copy(shapes_safetensors, Path("yolo_nas_s") / "weights.safetensors")
    assert resolve_source("yolo_nas_s") == Path("yolo_nas_s") / "weights.safetensors"
    shutil.copy(shapes_safetensors, "yolo_nas_s.pt")  # a file under Ultralytics' name is just a file
    assert resolve_source("yolo_nas_s.pt") == Path("yolo_nas_s.pt")
    assert load_checkpoint("yolo_nas_s.pt").num_classes == 6
