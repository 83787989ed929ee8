"""Read torch zip files that pickle whole objects, without importing or running any of them.

Ultralytics ships YOLO-NAS as ``torch.save(model)``: a pickle of super-gradients module objects.
``torch.load(weights_only=True)`` refuses such files and ``weights_only=False`` would execute
whatever the pickle asks for. This module unpickles them with an allow-list instead: every
super-gradients and ``torch.nn`` class becomes an inert :class:`PickledObject` that only records its
state, tensors become :class:`TensorRecord` placeholders (their bytes are read from the archive
afterwards, by our own code), a few plain containers and numpy reconstructors are allowed, and any
other global is refused before it can be called.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from nasquant.errors import NasquantError

try:  # numpy >= 2 moved its internals to numpy._core; pickles name either spelling
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray


class PickledObject:
    """Stands in for a pickled super-gradients or ``torch.nn`` object: it keeps the state, does nothing.

    The pickle can only construct it (arguments are kept, never interpreted) and hand it a state
    through ``__setstate__``; no method of the original class exists here, so nothing it names runs.
    """

    qualname: ClassVar[str] = ""
    args: tuple = ()
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def attributes(self) -> dict:
        """The object's ``__dict__`` as pickled (a ``(dict, slots)`` pair keeps only the dict)."""
        state = self.state
        if isinstance(state, tuple) and state and isinstance(state[0], dict):
            state = state[0]
        return state if isinstance(state, dict) else {}

    @property
    def is_module(self) -> bool:
        return "_parameters" in self.attributes or "_modules" in self.attributes

    def __repr__(self) -> str:
        return f"<pickled {self.qualname}>"


class _Sealed:
    """Base of everything our allow-list hands to the pickle: a crafted ``BUILD`` must not mutate it.

    Without ``__setstate__``, pickle's ``BUILD`` would ``setattr`` slot values, which could rewrite a
    shared marker (and so every later load in this process) or a helper function's defaults.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise ValueError(f"the pickle tries to set the state of a {type(self).__name__}")


class TensorRecord(_Sealed):
    """Where a pickled tensor's values live in the archive; :meth:`TorchZipReader.tensor` reads them.

    Deferring the read keeps the unpickling itself free of torch calls: a refused file has had no
    tensor built, and a crafted ``BUILD`` on a placeholder fails instead of reaching ``Tensor.__setstate__``.
    """

    __slots__ = ("offset", "size", "storage", "stride")

    def __init__(self, storage: StorageRecord, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride


class StorageRecord(_Sealed):
    """One ``data/<key>`` entry of the archive: its element type and length."""

    __slots__ = ("dtype", "key", "numel")

    def __init__(self, dtype: torch.dtype, key: str, numel: int) -> None:
        self.dtype = dtype
        self.key = key
        self.numel = numel


class _StorageType(_Sealed):
    """What ``torch.FloatStorage`` & co. unpickle to: only the element type is needed."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _SafeFunction(_Sealed):
    """One of our own stand-in functions, sealed so the pickle cannot rewrite its defaults."""

    __slots__ = ("_func",)

    def __init__(self, func: Callable[..., Any]) -> None:
        self._func = func

    def __call__(self, *args: Any) -> Any:
        return self._func(*args)


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(type(v) is int for v in value):
        raise ValueError(f"tensor {what} is not a tuple of integers")
    return tuple(value)


def _rebuild_tensor(
    storage: Any, storage_offset: Any, size: Any, stride: Any, *_ignored: Any
) -> TensorRecord:
    # Stands in for torch._utils._rebuild_tensor_v2; requires_grad, hooks and metadata are dropped.
    if not isinstance(storage, StorageRecord) or type(storage_offset) is not int:
        raise ValueError("malformed tensor record")
    return TensorRecord(storage, storage_offset, _ints(size, "size"), _ints(stride, "stride"))


def _rebuild_parameter(data: Any, *_ignored: Any) -> TensorRecord:
    # Stands in for torch._utils._rebuild_parameter(_with_state): a Parameter is just its data here.
    if not isinstance(data, TensorRecord):
        raise ValueError("malformed parameter record")
    return data


def _latin1_bytes(text: Any, encoding: str = "latin1") -> bytes:
    # Protocol-2 pickles spell bytes (e.g. numpy array buffers) as _codecs.encode(text, "latin1");
    # only that one codec is honoured.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError("unexpected _codecs.encode call")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _SafeFunction(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _SafeFunction(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _SafeFunction(_rebuild_parameter),
    ("_codecs", "encode"): _SafeFunction(_latin1_bytes),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{
        (module, "_reconstruct"): _np_multiarray._reconstruct
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    },
    **{
        (module, "scalar"): _np_multiarray.scalar
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    },
    # Protocol 2 (torch's default) names the builtins module ``__builtin__``.
    **{
        (module, container.__name__): container
        for module in ("builtins", "__builtin__")
        for container in (set, frozenset, list, dict, tuple)
    },
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}

# Classes from these packages become inert PickledObject stand-ins.
_STUBBED_PACKAGES = ("super_gradients.", "torch.nn.modules.")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self._path = path
        self._stubs: dict[str, type[PickledObject]] = {}
        self._storages: dict[str, StorageRecord] = {}

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module.startswith(_STUBBED_PACKAGES):
            qualname = f"{module}.{name}"
            if qualname not in self._stubs:
                self._stubs[qualname] = type(name, (PickledObject,), {"qualname": qualname})
            return self._stubs[qualname]
        raise NasquantError(
            f"refusing to load {self._path}: it references {module}.{name}, which is not on nasquant's "
            "allow-list (only tensors, plain containers and inert super-gradients/torch.nn records are read)"
        )

    def persistent_load(self, pid: Any) -> StorageRecord:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and type(pid[4]) is int
        ):
            # Described by its type only: str() of a crafted record can be astronomically long.
            raise ValueError(f"unsupported persistent record (a {type(pid).__name__})")
        _, storage_type, key, _location, numel = pid
        record = self._storages.get(key)
        if record is None:
            record = self._storages[key] = StorageRecord(storage_type.dtype, key, numel)
        return record


# Limits of the structure a checkpoint pickle may describe, checked before anything unpickles it.
# The pickled YOLO-NAS-S model (the shapes fixture, ~108,000 opcodes) nests 34 deep and its largest
# object expands to ~80,000 nodes when every shared (memoized) reference is counted in full; M and L
# have the same depth and roughly twice the nodes. The limits leave a wide margin above that, and
# stop what a crafted file of a few hundred bytes can otherwise do: a tuple built from two memo
# references of the previous one, forty times, is 2^40 nodes to hash as a dict key or to print.
MAX_PICKLE_DEPTH = 256
MAX_PICKLE_NODES = 5_000_000
#: Uncompressed size of the pickle record itself (the fixture's is 0.26 MB; tensors live apart).
MAX_PICKLE_BYTES = 256 << 20

_IN_PLACE = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_MEMO_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_MEMO_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})


class _Node:
    """One object the pickle builds: how many nodes it expands to and how deep it nests."""

    __slots__ = ("depth", "nodes")

    def __init__(self, nodes: int, depth: int) -> None:
        self.nodes = nodes
        self.depth = depth


def check_pickle_structure(stream: io.BufferedIOBase | bytes) -> None:
    """Refuse a pickle whose objects nest or expand beyond what checkpoints need, without running it.

    The opcodes are replayed on a stack of sizes only (pickletools' own opcode table says what each
    pops and pushes), so this costs one linear pass and builds nothing. A memo index beyond the
    number of opcodes read is refused too: the C unpickler allocates its memo up to the index.
    ``stream`` is left after the pickle's STOP opcode. Raises ``ValueError`` saying which limit.
    """
    if isinstance(stream, bytes):
        stream = io.BytesIO(stream)
    stack: list[_Node | None] = []  # None marks a MARK
    marks: list[int] = []
    memo: dict[int, _Node] = {}
    for count, (opcode, arg, _) in enumerate(pickletools.genops(stream), start=1):
        name = opcode.name
        if name == "MARK":
            marks.append(len(stack))
            stack.append(None)
            continue
        if name in _MEMO_PUT:
            index = len(memo) if name == "MEMOIZE" else arg
            if index > count:
                raise ValueError(f"memo index {index} at opcode {count}: pickles number their memo in order")
            if not stack or stack[-1] is None:
                raise ValueError(f"{name} with nothing to store")
            memo[index] = stack[-1]
            continue
        if name in _MEMO_GET:
            if arg not in memo:
                raise ValueError(f"memo index {arg} read before it is written")
            stack.append(memo[arg])
            continue
        if name == "DUP":
            if not stack:
                raise ValueError("DUP on an empty stack")
            stack.append(stack[-1])
            continue
        popped = _pop(stack, marks, opcode)
        if not opcode.stack_after:
            continue
        children = [node for node in popped if node is not None]
        if name in _IN_PLACE and children:
            node = children[0]
            node.nodes += sum(child.nodes for child in children[1:])
            node.depth = max([node.depth] + [child.depth + 1 for child in children[1:]])
        else:
            node = _Node(
                1 + sum(child.nodes for child in children), 1 + max((c.depth for c in children), default=0)
            )
        if node.depth > MAX_PICKLE_DEPTH:
            raise ValueError(f"objects nest more than {MAX_PICKLE_DEPTH} deep; checkpoints need about 40")
        if node.nodes > MAX_PICKLE_NODES:
            raise ValueError(
                f"an object expands to more than {MAX_PICKLE_NODES:,} nodes through shared references; "
                "a YOLO-NAS model pickle holds under 200,000"
            )
        stack.append(node)


def _pop(stack: list[_Node | None], marks: list[int], opcode: pickletools.OpcodeInfo) -> list[_Node | None]:
    """Remove what ``opcode`` consumes from ``stack``: everything above the last MARK when it takes one,
    plus the fixed number of items its table entry names."""
    before = opcode.stack_before
    popped: list[_Node | None] = []
    if pickletools.markobject in before:
        if not marks:
            raise ValueError(f"{opcode.name} without a MARK")
        start = marks.pop()
        popped = stack[start + 1 :]
        del stack[start:]
        below = before.index(pickletools.markobject)
    else:
        below = len(before)
    if len(stack) < below:
        raise ValueError(f"{opcode.name} on a stack of {len(stack)} items")
    if below:
        popped = stack[-below:] + popped
        del stack[-below:]
        if any(node is None for node in popped[:below]):  # POP may discard a MARK
            if opcode.name != "POP":
                raise ValueError(f"{opcode.name} reaches past a MARK")
            marks.pop()
    return popped


#: A torch archive stores its records uncompressed; a re-zipped one may deflate them a little.
MAX_ZIP_EXPANSION = 10


def check_zip_expansion(archive: zipfile.ZipFile, archive_bytes: int) -> None:
    """Refuse an archive whose records declare more than ``MAX_ZIP_EXPANSION`` times its own size:
    checking CRCs or reading such a file would decompress gigabytes out of a few kilobytes."""
    declared = sum(info.file_size for info in archive.infolist())
    if declared > MAX_ZIP_EXPANSION * archive_bytes + (1 << 20):
        raise ValueError(
            f"its records expand to {declared:,} bytes from {archive_bytes:,}, more than "
            f"{MAX_ZIP_EXPANSION}x: a zip bomb, not weights"
        )


class TorchZipReader:
    """A torch zip archive (``<folder>/data.pkl``, ``<folder>/data/<key>``, ``<folder>/byteorder``)."""

    def __init__(self, path: Path) -> None:
        """Open the archive and check its pickle's structure (:func:`check_pickle_structure`) before
        anything, torch's own loader included, unpickles it. Raises ``ValueError`` for a bad archive."""
        self.path = path
        self._zip = zipfile.ZipFile(path)
        try:
            check_zip_expansion(self._zip, path.stat().st_size)
            pickles = [
                name for name in self._zip.namelist() if name.endswith("data.pkl") and name.count("/") == 1
            ]
            if len(pickles) != 1:
                raise ValueError("zip archive without a torch data.pkl record")
            self._folder = pickles[0].rsplit("/", 1)[0]
            if self._zip.getinfo(pickles[0]).file_size > MAX_PICKLE_BYTES:
                raise ValueError(f"its pickle record is larger than {MAX_PICKLE_BYTES >> 20} MB")
            self._pickle = self._zip.read(pickles[0])
            check_pickle_structure(self._pickle)
            byteorder = self._read_optional("byteorder")
        except BaseException:
            self._zip.close()
            raise
        self._loaded: dict[str, torch.Tensor] = {}
        self._swap_bytes = (
            byteorder is not None and byteorder.strip().decode("ascii", "replace") != sys.byteorder
        )

    def __enter__(self) -> TorchZipReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._zip.close()

    def _read_optional(self, name: str) -> bytes | None:
        try:
            return self._zip.read(f"{self._folder}/{name}")
        except KeyError:
            return None

    def damaged_record(self) -> str | None:
        """The first record whose CRC does not match (``zipfile.ZipFile.testzip``), else None."""
        return self._zip.testzip()

    def load(self) -> Any:
        """Unpickle ``data.pkl`` with the allow-list; tensors come back as :class:`TensorRecord`."""
        return _RestrictedUnpickler(self._pickle, self.path).load()

    def tensor(self, record: TensorRecord) -> torch.Tensor:
        """Build the tensor a record describes, from its storage's bytes (bounds-checked)."""
        storage = self._storage(record.storage)
        if any(v < 0 for v in (record.offset, *record.size, *record.stride)) or len(record.size) != len(
            record.stride
        ):
            raise ValueError(
                f"tensor record over storage {record.storage.key} has a negative or ragged layout"
            )
        if math.prod(record.size) > storage.numel():
            # Stride 0 lets a few bytes describe 10^12 elements, which a later copy would allocate.
            raise ValueError(
                f"tensor record over storage {record.storage.key} holds {math.prod(record.size):,} elements, "
                f"more than the {storage.numel():,} its storage has"
            )
        if 0 not in record.size:
            last = record.offset + sum((n - 1) * s for n, s in zip(record.size, record.stride, strict=True))
            if last >= storage.numel():
                raise ValueError(f"tensor record reaches past the end of storage {record.storage.key}")
        return storage.as_strided(record.size, record.stride, record.offset)

    def _storage(self, record: StorageRecord) -> torch.Tensor:
        flat = self._loaded.get(record.key)
        if flat is not None:
            return flat
        raw = bytearray(self._zip.read(f"{self._folder}/data/{record.key}"))
        itemsize = torch.empty((), dtype=record.dtype).element_size()
        if len(raw) != record.numel * itemsize:
            raise ValueError(
                f"storage {record.key} holds {len(raw)} bytes, expected {record.numel * itemsize}"
            )
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        if self._swap_bytes and itemsize > 1:
            flat = flat.view(-1, itemsize).flip(1).reshape(-1)
        flat = flat.view(record.dtype)
        self._loaded[record.key] = flat
        return flat


def module_state_dict(
    module: PickledObject, tensor: Callable[[TensorRecord], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rebuild ``module.state_dict()`` from a pickled ``nn.Module``: same names, same order.

    Like torch, a module contributes its parameters, then its persistent buffers, then its children
    in registration order. Non-persistent buffers (QARepVGG's ``id_tensor``) are pickled with the
    module but are not part of its state dict, so they are skipped.
    """
    return dict(_walk(module, "", tensor, set()))


def _walk(
    module: PickledObject, prefix: str, tensor: Callable[[TensorRecord], torch.Tensor], seen: set[int]
) -> Iterator[tuple[str, torch.Tensor]]:
    if id(module) in seen:
        raise ValueError(f"module tree loops back on itself at {prefix or 'the root'}")
    seen.add(id(module))
    attributes = module.attributes
    skipped = attributes.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, value in _mapping(attributes.get(group), f"{prefix}{group}").items():
            if value is None or (group == "_buffers" and name in skipped):
                continue
            if not isinstance(value, TensorRecord):
                raise ValueError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            yield f"{prefix}{name}", tensor(value)
    for name, child in _mapping(attributes.get("_modules"), f"{prefix}_modules").items():
        if child is None:
            continue
        if not (isinstance(child, PickledObject) and child.is_module):
            raise ValueError(f"{prefix}{name} is not a pickled module")
        yield from _walk(child, f"{prefix}{name}.", tensor, seen)


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} is a {type(value).__name__}, not a dict")
    return value
