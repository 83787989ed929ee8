"""The allow-list unpickler: reads pickled super-gradients models, runs nothing, refuses the rest."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nasquant.errors import NasquantError
from nasquant.weights import load_checkpoint
from nasquant.weights.safe_pickle import (
    PickledObject,
    TorchZipReader,
    check_pickle_structure,
    module_state_dict,
)
from tests import crafted
from tests.weights.conftest import forget_super_gradients, write_zip_pickle


class _Exec:
    """Unpickling this runs ``exec`` (spelled ``__builtin__.exec`` under protocol 2)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_os_system_pickle_is_refused_and_does_not_run(malicious_checkpoint: tuple[Path, Path]) -> None:
    path, marker = malicious_checkpoint
    with pytest.raises(NasquantError) as exc:
        load_checkpoint(path)
    message = str(exc.value)
    assert message.startswith(f"refusing to load {path}: it references ")
    assert f"{os.system.__module__}.system" in message and "allow-list" in message and "\n" not in message
    assert not marker.exists()


def test_exec_pickle_in_a_torch_zip_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write_zip_pickle(tmp_path / "evil.pt", pickle.dumps({"net": _Exec(marker)}, protocol=2))
    with pytest.raises(NasquantError, match=r"evil\.pt: it references __builtin__\.exec"):
        load_checkpoint(path)
    assert not marker.exists()


def test_payload_hidden_inside_a_super_gradients_model_is_refused(
    tmp_path: Path, fake_super_gradients
) -> None:
    marker = tmp_path / "pwned"

    class Detector(nn.Module):
        pass

    _register(fake_super_gradients, Detector)
    model = Detector()
    model.hook = _Exec(marker)  # an attribute deep in an otherwise legitimate object graph
    path = tmp_path / "model.pt"
    torch.save(model, path)
    forget_super_gradients()
    with pytest.raises(NasquantError, match=r"refusing to load .*model\.pt: it references __builtin__\.exec"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("builtins", "eval"),
        ("__builtin__", "getattr"),
        ("subprocess", "Popen"),
        ("posix", "system"),
        ("functools", "partial"),
        ("torch", "load"),
        ("torch.serialization", "load"),
        ("numpy", "load"),
        ("collections", "defaultdict"),
    ],
)
def test_any_other_global_is_refused(tmp_path: Path, module: str, name: str) -> None:
    payload = f"\x80\x02c{module}\n{name}\n)R.".encode("latin1")  # GLOBAL, EMPTY_TUPLE, REDUCE
    path = write_zip_pickle(tmp_path / "g.pt", payload)
    with pytest.raises(
        NasquantError, match=rf"it references {module}\.{name}, which is not on nasquant's allow-list"
    ):
        load_checkpoint(path)


def test_old_non_zip_pickle_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps(_Exec(marker), protocol=2))
    with pytest.raises(
        NasquantError, match=r"legacy\.pt is not a readable YOLO-NAS checkpoint \(an old-style"
    ):
        load_checkpoint(path)
    assert not marker.exists()


def test_old_non_zip_state_dict_loads(tmp_path: Path, shapes_tensors: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "legacy.pth"
    torch.save({"net": shapes_tensors}, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    checkpoint = load_checkpoint(path)
    assert (checkpoint.variant, checkpoint.num_classes) == ("yolo_nas_s", 6)


def test_a_crafted_build_cannot_rewrite_the_allow_list(tmp_path: Path) -> None:
    # GLOBAL torch.FloatStorage, then BUILD with slot state {"dtype": "x"}: must fail, change nothing.
    payload = b"\x80\x02ctorch\nFloatStorage\nN}X\x05\x00\x00\x00dtypeX\x01\x00\x00\x00xs\x86b."
    path = write_zip_pickle(tmp_path / "build.pt", payload)
    with pytest.raises(
        NasquantError, match=r"not a readable YOLO-NAS checkpoint \(the pickle tries to set the state"
    ):
        load_checkpoint(path)
    reader_path = write_zip_pickle(tmp_path / "storage.pt", b"\x80\x02ctorch\nFloatStorage\n.")
    with TorchZipReader(reader_path) as reader:
        assert reader.load().dtype is torch.float32


def _register(module, *classes: type) -> None:
    for cls in classes:
        cls.__module__ = module.__name__
        cls.__qualname__ = cls.__name__
        setattr(module, cls.__name__, cls)


def _tiny_model(demo) -> nn.Module:
    """A small "super-gradients" model with the features the real ones pickle."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, bias=False)  # a None parameter in _parameters
            self.bn = nn.BatchNorm2d(4)
            self.alpha = nn.Parameter(torch.tensor([0.5]))
            self.register_buffer("id_tensor", torch.eye(4), persistent=False)  # like QARepVGG's

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(Block(), nn.ReLU())
            self.skip = None  # a None child in _modules
            self.heads = nn.ModuleList([nn.Conv2d(4, 6, 1), nn.ConvTranspose2d(6, 6, 2)])
            self.anchors = np.arange(3, dtype=np.float32)
            self.score = np.float64(0.25)

    class ComposeProcessing:
        def __init__(self, processings: list) -> None:
            self.processings = processings

    class DetectionCenterPadding:
        def __init__(self, output_shape: tuple, pad_value: int) -> None:
            self.output_shape = output_shape
            self.pad_value = pad_value

    _register(demo, Block, Detector, ComposeProcessing, DetectionCenterPadding)
    torch.manual_seed(0)
    model = Detector()
    model._class_names = ("a", "b")
    model._image_processor = ComposeProcessing([DetectionCenterPadding((640, 640), 114)])
    return model


def test_pickled_module_tree_rebuilds_the_state_dict(tmp_path: Path, fake_super_gradients) -> None:
    model = _tiny_model(fake_super_gradients)
    path = tmp_path / "tiny.pt"
    torch.save(model, path)
    expected = model.state_dict()
    forget_super_gradients()  # loading must not need the classes

    with TorchZipReader(path) as reader:
        root = reader.load()
        state_dict = module_state_dict(root, reader.tensor)

    assert isinstance(root, PickledObject) and root.qualname == "super_gradients.demo.Detector"
    assert list(state_dict) == list(expected)  # same order; id_tensor, None bias and None child skipped
    for key, value in expected.items():
        assert state_dict[key].dtype == value.dtype and torch.equal(state_dict[key], value), key
    attributes = root.attributes
    assert attributes["_class_names"] == ("a", "b")
    np.testing.assert_array_equal(attributes["anchors"], np.arange(3, dtype=np.float32))
    assert attributes["score"] == 0.25
    (padding,) = attributes["_image_processor"].attributes["processings"]
    assert padding.attributes == {"output_shape": (640, 640), "pad_value": 114}


def _rewrite(path: Path, change) -> None:
    """Copy a zip record by record, letting ``change(name, data)`` edit each one."""
    with zipfile.ZipFile(path) as source:
        records = [(info.filename, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w") as target:
        for name, data in records:
            target.writestr(name, change(name, data))


def test_big_endian_archive(tmp_path: Path, fake_super_gradients) -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 1)

    _register(fake_super_gradients, Head)
    model = Head()
    path = tmp_path / "big.pt"
    torch.save(model, path)
    forget_super_gradients()

    def to_big_endian(name: str, data: bytes) -> bytes:
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:
            return np.frombuffer(data, dtype="<f4").astype(">f4").tobytes()
        return data

    _rewrite(path, to_big_endian)
    with TorchZipReader(path) as reader:
        state_dict = module_state_dict(reader.load(), reader.tensor)
    assert torch.equal(state_dict["conv.weight"], model.conv.weight.detach())
    assert torch.equal(state_dict["conv.bias"], model.conv.bias.detach())


def test_short_storage_record_is_an_error_not_garbage(tmp_path: Path, fake_super_gradients) -> None:
    model = _tiny_model(fake_super_gradients)
    path = tmp_path / "short.pt"
    torch.save(model, path)
    forget_super_gradients()
    _rewrite(path, lambda name, data: data[:-4] if name.endswith("/data/0") else data)
    with (
        TorchZipReader(path) as reader,
        pytest.raises(ValueError, match=r"storage 0 holds \d+ bytes, expected"),
    ):
        module_state_dict(reader.load(), reader.tensor)


def test_an_expanded_tensor_cannot_claim_more_elements_than_its_storage(
    tmp_path: Path, fake_super_gradients
) -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # one stored float viewed as 10^6 elements (stride 0): a later copy would allocate them all
            self.register_buffer("table", torch.zeros(1).expand(1000, 1000))

    _register(fake_super_gradients, Head)
    path = tmp_path / "expanded.pt"
    torch.save(Head(), path)
    forget_super_gradients()
    with (
        TorchZipReader(path) as reader,
        pytest.raises(ValueError, match=r"holds 1,000,000 elements, more than the 1"),
    ):
        module_state_dict(reader.load(), reader.tensor)


# --- structure limits, checked before anything unpickles ----------------------------------------


def test_the_real_pickled_model_is_within_every_limit(shapes_pt: Path) -> None:
    with zipfile.ZipFile(shapes_pt) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("data.pkl")]
        check_pickle_structure(archive.read(name))  # no error: depth 34, ~80,000 nodes


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (crafted.tuple_key_bomb(), "expands to more than 5,000,000 nodes"),
        (crafted.persistent_id_bomb(), "expands to more than 5,000,000 nodes"),
        (crafted.nesting_bomb(), "nest more than 256 deep"),
        (crafted.memo_bomb(), "memo index 4294967295 at opcode 3"),
        (b"\x80\x02h\x05.", "memo index 5 read before it is written"),  # BINGET of nothing
        (b"\x80\x02N\x86.", "TUPLE2 on a stack of 1 items"),
        (b"\x80\x02e.", "APPENDS without a MARK"),
    ],
)
def test_malformed_structures_are_refused_before_unpickling(payload: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        check_pickle_structure(payload)


def test_a_persistent_id_is_described_not_printed(tmp_path: Path) -> None:
    # A long persistent id (within the limits) in an error message: its type, not its str().
    payload = b"\x80\x02](" + b"N" * 1000 + b"eQ."  # EMPTY_LIST MARK None*1000 APPENDS BINPERSID STOP
    path = write_zip_pickle(tmp_path / "pid.pt", payload)
    with pytest.raises(NasquantError) as caught:
        load_checkpoint(path)
    assert "unsupported persistent record (a list)" in str(caught.value) and len(str(caught.value)) < 300
