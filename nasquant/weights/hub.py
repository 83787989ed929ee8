"""Turn what the user typed (a path, a folder, a URL, ``yolo_nas_s|m|l`` or Ultralytics' file name
``yolo_nas_s|m|l.pt``) into one local file.

Downloads go to a cache (``$NASQUANT_CACHE``, default ``~/.cache/nasquant``) through
``urllib.request`` only, streamed to a temporary ``.part`` file that is renamed into place when
complete, so an interrupted or failed download never leaves a file under the final name.
:func:`download` is also the downloader of :mod:`nasquant.data.hub_datasets`.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from nasquant.errors import NasquantError
from nasquant.io import atomic_path

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")

# Deci's original host (sghub.deci.ai) no longer serves the weights. NVIDIA's S3 copy holds the
# plain super-gradients .pth files (preferred: state dicts, read without any unpickling tricks);
# Ultralytics' release assets hold the same networks as pickled model objects (.pt).
MIRRORS: dict[str, tuple[str, ...]] = {
    variant: (
        f"https://sg-hub-nv.s3.amazonaws.com/models/{variant}_coco.pth",
        f"https://github.com/ultralytics/assets/releases/download/v8.1.0/{variant}.pt",
    )
    for variant in ("yolo_nas_s", "yolo_nas_m", "yolo_nas_l")
}

# (size in bytes, sha256) of known mirror files. UNVERIFIED: taken from a public Git LFS pointer to
# yolo_nas_s_coco.pth, not from a download made here. A size that differs is an error (the transfer
# or the mirror is broken); a sha256 that differs only produces a warning until someone confirms it.
KNOWN_FILES: dict[str, tuple[int, str]] = {
    "https://sg-hub-nv.s3.amazonaws.com/models/yolo_nas_s_coco.pth": (
        76_688_335,
        "c1b1d9148ab8ae5d5984699547e850955ff9efccaf568c67b3d605acb4bfe1cb",
    ),
}

TIMEOUT_S = 30
_CHUNK = 1 << 20


class DownloadFailed(Exception):
    """One URL did not give us the file; callers put the reason (the text) in their own one-line error."""


def cache_dir_default() -> Path:
    """``$NASQUANT_CACHE`` if set, else ``~/.cache/nasquant``."""
    override = os.environ.get("NASQUANT_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "nasquant"


def mirrored(url: str) -> str:
    """``url`` itself, or its file name on ``$NASQUANT_MIRROR`` when that is set.

    ``$NASQUANT_MIRROR`` (a base URL, e.g. an internal server for offline sites) replaces the
    public hosts of everything nasquant downloads; it must serve the same file names.
    """
    base = os.environ.get("NASQUANT_MIRROR")
    return f"{base.rstrip('/')}/{_url_file_name(url)}" if base else url


def mirrors_for(alias: str) -> tuple[str, ...]:
    """The URLs tried, in order, for ``yolo_nas_s|m|l`` (see :func:`mirrored`)."""
    return tuple(mirrored(url) for url in MIRRORS[alias])


def checkpoint_alias(text: str) -> str | None:
    """The alias ``text`` names (``yolo_nas_s``, ``YOLO-NAS-S``, or ``yolo_nas_s.pt``), else None.

    Ultralytics' YOLO-NAS page says ``NAS("yolo_nas_s.pt")`` and downloads that file on first use, so
    the file name is an alias too; callers check for a local file of that name first.
    """
    name = text.strip().lower().replace("-", "_").removesuffix(".pt")
    return name if name in MIRRORS else None


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file; remembered per (path, size, mtime) so reloading a checkpoint is cheap."""
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_source(
    source: str | os.PathLike,
    *,
    sha256: str | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> Path:
    """Local checkpoint file for ``source``; downloads aliases and URLs into the cache first.

    An existing path always wins over an alias of the same name. With ``sha256`` pinned the file
    is verified (a cached file that does not match is downloaded again).
    """
    pinned = sha256.strip().lower() if sha256 else None
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        local = _single_checkpoint_in(path) if path.is_dir() else path
        if pinned:
            actual = file_sha256(local)
            if actual != pinned:
                raise NasquantError(f"{local} has sha256 {actual}, but {pinned} was pinned")
        return local
    cache = Path(cache_dir) if cache_dir is not None else cache_dir_default()
    if isinstance(source, str) and text.startswith(("http://", "https://")):
        if not _url_file_name(text):
            raise NasquantError(
                f"cannot tell a file name from the URL {text}; download it and pass its local path"
            )
        return _fetch(text, (text,), cache, pinned, progress)
    alias = checkpoint_alias(text) if isinstance(source, str) else None
    if alias is not None:
        return _fetch(alias, mirrors_for(alias), cache, pinned, progress)
    raise NasquantError(
        f"no such checkpoint file: {text} (expected a .pt/.pth/.safetensors file, a folder holding one, "
        f"a URL, or an alias: {', '.join(MIRRORS)}, with or without .pt)"
    )


def _single_checkpoint_in(folder: Path) -> Path:
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if len(found) == 1:
        return found[0]
    if not found:
        raise NasquantError(f"no checkpoint (.pt/.pth/.safetensors) in folder {folder}")
    names = ", ".join(p.name for p in found)
    raise NasquantError(f"folder {folder} holds several checkpoints ({names}); pass the file itself")


def _url_file_name(url: str) -> str:
    return Path(urllib.parse.urlsplit(url).path).name


def _fetch(what: str, urls: tuple[str, ...], cache: Path, pinned: str | None, progress: bool) -> Path:
    """The first cached copy of ``urls`` that checks out, else the first successful download."""
    for url in urls:
        cached = cache / _url_file_name(url)
        if cached.is_file() and _cached_copy_is_good(url, cached, pinned):
            return cached
    failures = []
    for url in urls:
        dest = cache / _url_file_name(url)
        try:
            digest = download(url, dest, sha256=pinned, progress=progress)
        except DownloadFailed as exc:
            failures.append(f"{url} ({exc})")
            continue
        if not pinned:
            _announce(url, dest, digest)
        return dest
    targets = " or ".join(str(cache / _url_file_name(url)) for url in urls)
    raise NasquantError(
        f"could not download {what}: {'; '.join(failures)}. Fetch the file by hand and put it at {targets}, "
        "or pass its local path"
    )


def _announce(url: str, dest: Path, digest: str) -> None:
    """One stderr line with the new file's sha256, so the user learns what to pin."""
    known_sha = KNOWN_FILES.get(url, (None, None))[1]
    note = ""
    if known_sha and digest != known_sha:
        note = f"; differs from the recorded, unverified sha256 {known_sha}"
    print(f"nasquant: downloaded {url} to {dest} (sha256 {digest}{note})", file=sys.stderr)


def _cached_copy_is_good(url: str, path: Path, pinned: str | None) -> bool:
    known = KNOWN_FILES.get(url)
    if known and path.stat().st_size != known[0]:
        return False
    return pinned is None or file_sha256(path) == pinned


def download(url: str, dest: Path, *, sha256: str | None = None, progress: bool = True) -> str:
    """Stream ``url`` to ``dest`` (atomically, with a progress bar) and return its sha256.

    Raises :class:`DownloadFailed` (nothing written at ``dest``) when the URL is unreachable, answers
    an HTTP error, sends fewer bytes than announced, or the file's size (:data:`KNOWN_FILES`) or the
    pinned ``sha256`` does not match.
    """
    known_size = KNOWN_FILES.get(url, (None, None))[0]
    request = urllib.request.Request(url, headers={"User-Agent": "nasquant"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            header = response.headers.get("Content-Length")
            total = int(header) if header and header.isdigit() else None
            if known_size is not None and total is not None and total != known_size:
                raise DownloadFailed(f"it offers {total} bytes, expected {known_size}")
            with atomic_path(dest) as part:
                digest, received = _stream(response, part, total, dest.name, progress)
                if total is not None and received != total:
                    raise DownloadFailed(f"connection closed after {received} of {total} bytes")
                if known_size is not None and received != known_size:
                    raise DownloadFailed(f"received {received} bytes, expected {known_size}")
                if sha256 and digest != sha256:
                    raise DownloadFailed(f"sha256 {digest}, but {sha256} was pinned")
    except urllib.error.HTTPError as exc:
        raise DownloadFailed(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DownloadFailed(str(exc.reason)) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise DownloadFailed(f"{type(exc).__name__}: {exc}") from None
    return digest


def _stream(
    response: http.client.HTTPResponse, part: Path, total: int | None, label: str, progress: bool
) -> tuple[str, int]:
    digest = hashlib.sha256()
    received = 0
    with (
        part.open("wb") as out,
        tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=not progress
        ) as bar,
    ):
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return digest.hexdigest(), received
