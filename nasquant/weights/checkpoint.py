"""Load YOLO-NAS weights from any of the forms they circulate in, into one plain description.

Formats are recognised by their content, not their extension: a torch zip (super-gradients
``.pth`` state dicts, or Ultralytics-style pickled model objects read through
:mod:`nasquant.weights.safe_pickle`), a ``.safetensors`` file, or an old non-zip torch pickle.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from nasquant.artifacts import MAX_INPUT_SIZE
from nasquant.checks import quoted
from nasquant.errors import NasquantError
from nasquant.models.yolo_nas import VARIANTS, normalize_variant
from nasquant.weights.hub import file_sha256, resolve_source
from nasquant.weights.safe_pickle import (
    PickledObject,
    TensorRecord,
    TorchZipReader,
    check_pickle_structure,
    module_state_dict,
)

# Shapes that tell the variants apart (super-gradients 3.7.1 arch params). Each is the output or
# input width of a plain conv, so it survives QARepVGG re-parameterization and Conv+BN folding:
# stage-1 hidden width, stage-1 concat width (M and L concatenate the bottleneck outputs), neck1
# hidden width, and head width.
_SIGNATURE_KEYS = (
    ("backbone.stage1.blocks.conv1.conv.weight", 0, "stage1 hidden"),
    ("backbone.stage1.blocks.conv3.conv.weight", 1, "stage1 concat"),
    ("neck.neck1.blocks.conv1.conv.weight", 0, "neck1 hidden"),
    ("heads.head1.stem.seq.conv.weight", 0, "head width"),
)
_SIGNATURES = {
    (32, 64, 64, 64): "yolo_nas_s",
    (64, 256, 192, 96): "yolo_nas_m",
    (96, 384, 128, 128): "yolo_nas_l",
}
# 4 box sides x (reg_max 16 + 1) distribution bins, the same for every variant.
_REG_CHANNELS = 68
_HEADS = ("heads.head1", "heads.head2", "heads.head3")

# Where a checkpoint dict keeps its network, best first: super-gradients evaluates the EMA weights.
_CONTAINER_KEYS = ("ema_net", "net", "model", "state_dict")
_STRIPPED_PREFIXES = ("module.", "net.")
_DEFAULT_PAD_VALUE = 114
# Pixel counts in metadata: plain decimal, at most 6 digits (int() of a 5,000-digit string raises).
_PIXELS = re.compile(r"[0-9]{1,6}")
_INPUT_SIZE = re.compile(r"\s*([0-9]{1,6})\s*x\s*([0-9]{1,6})\s*")


@dataclass
class Checkpoint:
    """YOLO-NAS weights and what the file says about them.

    ``state_dict`` uses super-gradients' key names (wrapper prefixes removed) in the file's order;
    floating tensors are float32, integer buffers (``num_batches_tracked``) stay int64.
    ``.safetensors`` files do not keep an order, so their keys come sorted.
    """

    state_dict: dict[str, torch.Tensor] = field(repr=False)
    variant: str
    num_classes: int
    class_names: list[str] | None
    processing: dict | None
    path: Path
    sha256: str


@dataclass
class _Contents:
    """What a reader found, before validation."""

    tensors: dict[str, torch.Tensor]
    class_names: list[str] | None = None
    processing: dict | None = None
    declared: dict[str, str] = field(default_factory=dict)  # arch / num_classes metadata, cross-checked


def load_checkpoint(
    source: str | os.PathLike,
    *,
    variant: str | None = None,
    num_classes: int | None = None,
    sha256: str | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> Checkpoint:
    """Read YOLO-NAS weights from a file, folder, URL or alias (``yolo_nas_s|m|l``).

    The variant and class count come from the tensors; ``variant`` and ``num_classes``, when
    given, must agree with them. Nothing in the file is executed.
    """
    requested = normalize_variant(variant) if variant is not None else None
    path = resolve_source(source, sha256=sha256, cache_dir=cache_dir, progress=progress)
    contents = _read(path)
    _check_processing(contents.processing, path)
    tensors = _strip_prefixes(contents.tensors, path)
    try:
        found = infer_variant(tensors)
    except NasquantError as exc:
        raise NasquantError(f"{path}: {exc}") from None
    classes = int(tensors["heads.head1.cls_pred.weight"].shape[0])
    _check_declared(path, contents.declared, found, classes)
    if requested is not None and requested != found:
        raise NasquantError(
            f"checkpoint {path} holds {found} weights ({classes} classes), but variant {requested} was requested"
        )
    if num_classes is not None and int(num_classes) != classes:
        raise NasquantError(
            f"checkpoint {path} holds {found} weights with {classes} classes, but num_classes={num_classes} "
            "was requested"
        )
    names = contents.class_names
    if names is not None and len(names) != classes:
        raise NasquantError(
            f"{path} records {len(names)} class names, but its class head has {classes} outputs"
        )
    return Checkpoint(
        state_dict=tensors,
        variant=found,
        num_classes=classes,
        class_names=names,
        processing=contents.processing,
        path=path,
        sha256=file_sha256(path),
    )


def infer_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``yolo_nas_s|m|l`` from tensor shapes; raises :class:`NasquantError` if it is no YOLO-NAS.

    Works on unfused, re-parameterized and Conv+BN-folded state dicts alike, and checks that the
    three heads agree on their class count and box-distribution width.
    """
    required = [key for key, _, _ in _SIGNATURE_KEYS] + [
        f"{head}.{part}.weight" for head in _HEADS for part in ("cls_pred", "reg_pred")
    ]
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise NasquantError(
            f"not a YOLO-NAS state dict: {len(state_dict)} tensors, but no {missing[0]}"
            + (f" (and {len(missing) - 1} more YOLO-NAS keys)" if len(missing) > 1 else "")
        )
    bad = [
        key for key in required if not isinstance(state_dict[key], torch.Tensor) or state_dict[key].dim() != 4
    ]
    if bad:
        raise NasquantError(f"not a YOLO-NAS state dict: {bad[0]} is not a 4-D conv weight")
    widths = tuple(int(state_dict[key].shape[dim]) for key, dim, _ in _SIGNATURE_KEYS)
    variant = _SIGNATURES.get(widths)
    if variant is None:
        seen = ", ".join(
            f"{label} {width}" for (_, _, label), width in zip(_SIGNATURE_KEYS, widths, strict=True)
        )
        expected = "; ".join(
            f"{name[-1].upper()} {'/'.join(map(str, sig))}" for sig, name in _SIGNATURES.items()
        )
        raise NasquantError(f"tensors match no YOLO-NAS variant ({seen}; expected {expected})")
    classes = {int(state_dict[f"{head}.cls_pred.weight"].shape[0]) for head in _HEADS}
    if len(classes) != 1:
        raise NasquantError(f"the three heads disagree on the class count ({sorted(classes)})")
    reg = {int(state_dict[f"{head}.reg_pred.weight"].shape[0]) for head in _HEADS}
    if reg != {_REG_CHANNELS}:
        raise NasquantError(f"box heads have {sorted(reg)} outputs, expected {_REG_CHANNELS}")
    return variant


def _read(path: Path) -> _Contents:
    try:
        with path.open("rb") as handle:
            head = handle.read(32)
        size = path.stat().st_size
    except OSError as exc:
        raise NasquantError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            raise _unreadable(path, "a damaged or truncated zip archive: its end is missing")
        return _read_torch_zip(path)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head, size):
        return _read_safetensors(path)
    if head.startswith(b"\x80") and len(head) > 1 and head[1] <= pickle.HIGHEST_PROTOCOL:
        return _read_legacy_torch(path)
    raise _unreadable(path, _describe(head, size))


def _unreadable(path: Path, reason: str) -> NasquantError:
    return NasquantError(f"{path} is not a readable YOLO-NAS checkpoint ({reason})")


def _first_line(exc: BaseException) -> str:
    """A short reason: the message's first line, named by its type unless it is one of our ValueErrors."""
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else ""
    if type(exc) is not ValueError or not line:
        line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def _describe(head: bytes, size: int) -> str:
    """Why a file with these first bytes is no checkpoint, in words a user can act on."""
    if size == 0:
        return "the file is empty"
    if head.startswith(b"\xff\xd8\xff"):
        return "it is a JPEG image"
    if head.startswith(b"\x89PNG"):
        return "it is a PNG image"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the weights; run `git lfs pull`"
    if head.lstrip().startswith(b"<"):
        return "it is an HTML/XML document, perhaps an error page saved instead of the file"
    if all(byte >= 32 or byte in b"\t\n\r" for byte in head):
        return "it is a text file"
    return "unknown format; expected a torch .pt/.pth file or .safetensors"


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    # 8-byte little-endian header length, then the JSON header itself.
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return header_len < size


def _read_torch_zip(path: Path) -> _Contents:
    try:
        # Opening checks the pickle's structure first: torch's weights-only loader below unpickles
        # too, and a crafted nesting would stall it as much as ours.
        reader = TorchZipReader(path)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise _unreadable(path, _first_line(exc)) from None
    with reader:
        # torch does not check the zip's CRCs, so a damaged download would load as silently wrong weights.
        try:
            damaged = reader.damaged_record()
        except (OSError, zipfile.BadZipFile) as exc:
            raise _unreadable(path, _first_line(exc)) from None
        if damaged is not None:
            raise _unreadable(path, f"damaged zip archive: record {damaged} fails its CRC check")
        # torch's own weights-only loader first: it reads plain state-dict files (super-gradients .pth)
        # and refuses anything that pickles objects, which the allow-list reader then handles.
        try:
            payload = _torch_load_weights_only(path)
        except Exception:
            pass
        else:
            return _contents(payload, path)
        try:
            return _contents(reader.load(), path, reader)
        except NasquantError:
            raise
        except Exception as exc:
            raise _unreadable(path, _first_line(exc)) from None


def _torch_load_weights_only(path: Path) -> Any:
    # torch warns about pickle protocols its weights-only reader may not handle; whatever it cannot
    # read is reported (or read by the allow-list reader) by us, so the warning would only be noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def _read_legacy_torch(path: Path) -> _Contents:
    # Pre-1.6 torch files are not zip archives; torch's weights-only loader still reads those that
    # hold only tensors and containers. Pickled objects in that format are not supported.
    try:
        with path.open("rb") as handle:
            # magic number, format version, system info, the object, its storage keys: five pickles
            for _ in range(5):
                check_pickle_structure(handle)
    except (OSError, ValueError) as exc:
        raise _unreadable(path, f"an old-style (non-zip) torch pickle: {_first_line(exc)}") from None
    try:
        payload = _torch_load_weights_only(path)
    except Exception as exc:
        raise _unreadable(
            path,
            f"an old-style (non-zip) torch pickle that nasquant cannot read safely: {_first_line(exc)}; "
            "re-save its state dict with a current torch",
        ) from None
    return _contents(payload, path)


def _contents(payload: Any, path: Path, reader: TorchZipReader | None = None) -> _Contents:
    """Find the network in an unpickled checkpoint: a state dict or a pickled model object.

    ``reader`` is the archive the allow-list reader unpickled ``payload`` from; only such payloads
    hold pickled modules and tensor records.
    """
    metadata = payload.get("processing_params") if isinstance(payload, dict) else None
    node = payload
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
        if not isinstance(node, dict) or _is_tensor_mapping(node):
            break
        inner = next((node[key] for key in _CONTAINER_KEYS if node.get(key) is not None), None)
        if inner is None:
            break
        node = inner
    if reader is not None and isinstance(node, PickledObject) and node.is_module:
        attributes = node.attributes
        return _Contents(
            tensors=module_state_dict(node, reader.tensor),
            class_names=_names(attributes.get("_class_names")),
            processing=_processing(_steps(attributes.get("_image_processor"))),
        )
    if isinstance(node, dict) and node and _is_tensor_mapping(node):
        names = _names(metadata.get("class_names")) if isinstance(metadata, dict) else None
        steps = _steps(metadata.get("image_processor")) if isinstance(metadata, dict) else []
        return _Contents(
            tensors={str(k): _tensor(v, reader) for k, v in node.items()},
            class_names=names,
            processing=_processing(steps),
        )
    found = ", ".join(map(str, list(payload)[:6])) if isinstance(payload, dict) else type(payload).__name__
    raise _unreadable(path, f"no state dict or model inside; it holds {found}")


def _tensor(value: torch.Tensor | TensorRecord, reader: TorchZipReader | None) -> torch.Tensor:
    return reader.tensor(value) if reader is not None and isinstance(value, TensorRecord) else value


def _is_tensor_mapping(node: dict) -> bool:
    return all(isinstance(v, torch.Tensor | TensorRecord) for v in node.values())


def _names(value: Any) -> list[str] | None:
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _steps(processor: Any) -> list[tuple[str, dict]]:
    """super-gradients' image processor as ``[(class name, parameters), ...]``.

    Pickled models hold ``ComposeProcessing`` objects; training checkpoints hold the same pipeline
    as config: ``{"ComposeProcessing": {"processings": [{"DetectionCenterPadding": {...}}, ...]}}``.
    """
    if isinstance(processor, PickledObject):
        items = processor.attributes.get("processings")
        if not isinstance(items, list):
            return []
        return [(p.qualname.rsplit(".", 1)[-1], p.attributes) for p in items if isinstance(p, PickledObject)]
    if isinstance(processor, dict) and isinstance(processor.get("ComposeProcessing"), dict):
        steps = []
        for item in processor["ComposeProcessing"].get("processings") or []:
            if isinstance(item, str):
                steps.append((item, {}))
            elif isinstance(item, dict) and len(item) == 1:
                ((name, params),) = item.items()
                steps.append((str(name), params if isinstance(params, dict) else {}))
        return steps
    return []


def _processing(steps: list[tuple[str, dict]]) -> dict | None:
    """``{"resize", "imgsz", "pad_value"}`` from a longest-side resize followed by centre padding.

    Pipelines of another shape (bottom-right padding, plain resize) are reported as unknown rather
    than approximated, so callers fall back to their documented defaults.
    """
    resize = pad = None
    for name, params in steps:
        if name == "DetectionLongestMaxSizeRescale":
            resize = _side(params.get("output_shape"))
        elif name == "DetectionCenterPadding":
            pad = (_side(params.get("output_shape")), params.get("pad_value", _DEFAULT_PAD_VALUE))
        elif name in ("DetectionBottomRightPadding", "DetectionRescale", "DetectionPaddedRescale"):
            return None
    if pad is None or pad[0] is None or not isinstance(pad[1], int | float) or not math.isfinite(pad[1]):
        return None
    imgsz, pad_value = pad
    return {"resize": resize or imgsz, "imgsz": imgsz, "pad_value": int(pad_value)}


def _check_processing(processing: dict | None, path: Path) -> None:
    """A recorded preprocessing must describe a real image: a resize within a canvas nasquant can run."""
    if processing is None:
        return
    resize, imgsz, pad = processing["resize"], processing["imgsz"], processing["pad_value"]
    if not (1 <= resize <= imgsz <= MAX_INPUT_SIZE and 0 <= pad <= 255):
        raise _unreadable(
            path,
            f"its recorded preprocessing is impossible: long side {resize} in a {imgsz}-px input padded "
            f"with {pad} (need 1 <= long side <= input <= {MAX_INPUT_SIZE}, pad 0..255)",
        )


def _side(shape: Any) -> int | None:
    if isinstance(shape, list | tuple) and len(shape) == 2 and all(isinstance(v, int) for v in shape):
        return max(shape)
    return None


def _read_safetensors(path: Path) -> _Contents:
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:
        raise _unreadable(path, f"bad safetensors file: {_first_line(exc)}") from None
    classes = metadata.get("classes")
    names = [name.strip() for name in classes.split(",")] if classes else None
    return _Contents(
        tensors=tensors,
        class_names=names,
        processing=_safetensors_processing(metadata, path),
        declared={key: metadata[key] for key in ("arch", "num_classes") if key in metadata},
    )


def _safetensors_processing(metadata: dict[str, str], path: Path) -> dict | None:
    """Our metadata keys: ``input_size`` "HxW" (resize the long side to it, centre-pad to a square),
    refined by ``processing_resize`` / ``processing_imgsz`` / ``processing_pad_value`` when present."""
    processing: dict[str, int] = {}
    size = metadata.get("input_size")
    if size:
        match = _INPUT_SIZE.fullmatch(size.strip().lower())
        if match is None:
            raise _unreadable(path, f"metadata input_size {quoted(size)} is not HxW")
        side = max(int(match.group(1)), int(match.group(2)))
        processing = {"resize": side, "imgsz": side, "pad_value": _DEFAULT_PAD_VALUE}
    for key in ("resize", "imgsz", "pad_value"):
        value = metadata.get(f"processing_{key}")
        if value is None:
            continue
        if not _PIXELS.fullmatch(value.strip()):
            raise _unreadable(path, f"metadata processing_{key} {quoted(value)} is not an integer")
        processing[key] = int(value)
    if not processing:
        return None
    processing.setdefault("pad_value", _DEFAULT_PAD_VALUE)
    processing.setdefault("imgsz", processing.get("resize", 0))
    processing.setdefault("resize", processing["imgsz"])
    return {key: processing[key] for key in ("resize", "imgsz", "pad_value")}


def _check_declared(path: Path, declared: dict[str, str], variant: str, classes: int) -> None:
    # Only names we know are compared: other tools may write their own spelling of the architecture.
    arch = declared.get("arch", "").strip().lower().replace("-", "_")
    if arch in VARIANTS and arch != variant:
        raise NasquantError(f"{path} says it holds {arch} (metadata), but its tensors are {variant}")
    count = declared.get("num_classes")
    if count is not None and count.strip() != str(classes):
        raise NasquantError(
            f"{path} says it has {count} classes (metadata), but its class head has {classes}"
        )


def _strip_prefixes(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Drop DataParallel/wrapper prefixes (``module.``, ``net.``, repeated) and make floats float32.

    Refuses a tensor that claims more elements than its storage holds (a stride-0 view: the float32
    copy would allocate them all) and weights that are NaN or infinite (they run, and score 0 mAP).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise _unreadable(path, f"{key} is a {type(value).__name__}, not a tensor")
        name = key
        while name.startswith(_STRIPPED_PREFIXES):
            name = name.split(".", 1)[1]
        if name in out:
            raise _unreadable(path, f"two tensors are both named {name} once prefixes are removed")
        stored = value.untyped_storage().nbytes() // value.element_size()
        if value.numel() > stored:
            raise _unreadable(
                path, f"tensor {key} claims {value.numel():,} elements but its storage holds {stored:,}"
            )
        if value.is_floating_point():
            value = value.float()
            if not bool(torch.isfinite(value).all()):
                raise NasquantError(
                    f"{path}: tensor {key} holds NaN or infinite values; the weights are broken"
                )
        out[name] = value
    return out
