"""Loading the formats YOLO-NAS weights circulate in, and telling S, M and L apart."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nasquant.errors import NasquantError
from nasquant.weights import Checkpoint, infer_variant, load_checkpoint
from tests.weights.conftest import SHAPES_CLASSES, synthetic_state_dict

SHAPES_PROCESSING = {"resize": 320, "imgsz": 320, "pad_value": 114}


def _assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


def test_ultralytics_style_pt_loads_without_super_gradients(
    shapes_pt: Path, manifest: dict, shapes_float32: dict[str, torch.Tensor]
) -> None:
    assert importlib.util.find_spec("super_gradients") is None, "this test needs super_gradients absent"
    checkpoint = load_checkpoint(shapes_pt)
    assert "super_gradients" not in sys.modules

    assert isinstance(checkpoint, Checkpoint)
    assert (checkpoint.variant, checkpoint.num_classes) == ("yolo_nas_s", 6)
    assert checkpoint.class_names == SHAPES_CLASSES
    assert checkpoint.processing == SHAPES_PROCESSING
    assert checkpoint.path == shapes_pt
    assert checkpoint.sha256 == "7229c2d61cea112281c1e49088e409d8db4cbd0e4df277cf66ac52164d2b3ec6"

    # Same names, order and shapes as super-gradients' own state_dict(), with a 6-class head.
    expected = [
        (key, [6, *shape[1:]] if ".cls_pred." in key else shape) for key, shape, _ in manifest["yolo_nas_s"]
    ]
    assert len(checkpoint.state_dict) == 921
    assert [(key, list(t.shape)) for key, t in checkpoint.state_dict.items()] == expected
    assert not any(key.endswith("id_tensor") for key in checkpoint.state_dict)

    # The fixture's README: upcast float16 safetensors == the pickled float32 tensors, exactly.
    for key, value in checkpoint.state_dict.items():
        assert torch.equal(value, shapes_float32[key]), key
    assert checkpoint.state_dict["heads.head1.cls_pred.weight"].dtype == torch.float32
    assert checkpoint.state_dict["heads.head1.stem.seq.bn.num_batches_tracked"].dtype == torch.int64


def test_safetensors_is_upcast_and_reads_its_metadata(shapes_safetensors: Path, shapes_pt: Path) -> None:
    checkpoint = load_checkpoint(shapes_safetensors)
    assert (checkpoint.variant, checkpoint.num_classes) == ("yolo_nas_s", 6)
    assert checkpoint.class_names == SHAPES_CLASSES
    assert checkpoint.processing == SHAPES_PROCESSING
    assert {t.dtype for t in checkpoint.state_dict.values()} == {torch.float32, torch.int64}
    pickled = load_checkpoint(shapes_pt).state_dict
    assert sorted(checkpoint.state_dict) == sorted(pickled)
    assert all(torch.equal(checkpoint.state_dict[k], v) for k, v in pickled.items())


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: {"net": sd, "acc": 0.5, "epoch": 3}, id="net"),
        pytest.param(
            lambda sd: {"ema_net": sd, "net": {k: v + 1 for k, v in sd.items()}}, id="ema_net-preferred"
        ),
        pytest.param(lambda sd: {"model": sd}, id="model"),
        pytest.param(
            lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}}, id="state_dict-module"
        ),
        pytest.param(
            lambda sd: {"net": {f"module.net.{k}": v for k, v in sd.items()}}, id="module-net-prefix"
        ),
        pytest.param(lambda sd: sd, id="bare"),
    ],
)
def test_pth_containers_all_give_the_same_tensors(
    wrap, tmp_path: Path, shapes_tensors: dict[str, torch.Tensor], shapes_float32: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "weights.pth"
    torch.save(wrap(shapes_tensors), path)
    checkpoint = load_checkpoint(path)
    assert (checkpoint.variant, checkpoint.num_classes) == ("yolo_nas_s", 6)
    assert checkpoint.class_names is None and checkpoint.processing is None
    # float16 on disk, float32 in memory; the .pth keeps super-gradients' order (safetensors sorted it).
    _assert_same_tensors(dict(sorted(checkpoint.state_dict.items())), dict(sorted(shapes_float32.items())))


def test_pth_keeps_the_file_order(
    tmp_path: Path, shapes_float32: dict[str, torch.Tensor], manifest: dict
) -> None:
    ordered = {key: shapes_float32[key] for key, _, _ in manifest["yolo_nas_s"]}
    torch.save({"net": ordered}, tmp_path / "ordered.pth")
    assert list(load_checkpoint(tmp_path / "ordered.pth").state_dict) == list(ordered)


def test_training_checkpoint_processing_params_are_recovered(
    tmp_path: Path, shapes_tensors: dict[str, torch.Tensor]
) -> None:
    # super-gradients' trainer stores the validation pipeline as config next to the weights.
    processing_params = {
        "class_names": SHAPES_CLASSES,
        "image_processor": {
            "ComposeProcessing": {
                "processings": [
                    {"DetectionLongestMaxSizeRescale": {"output_shape": (636, 636)}},
                    {"DetectionCenterPadding": {"output_shape": (640, 640), "pad_value": 114}},
                    {"StandardizeImage": {"max_value": 255.0}},
                    "ImagePermute",
                ]
            }
        },
        "iou": 0.7,
        "conf": 0.25,
    }
    path = tmp_path / "ckpt_best.pth"
    torch.save({"net": shapes_tensors, "processing_params": processing_params}, path)
    checkpoint = load_checkpoint(path)
    assert checkpoint.class_names == SHAPES_CLASSES
    assert checkpoint.processing == {"resize": 636, "imgsz": 640, "pad_value": 114}


def test_bottom_right_padding_is_not_mistaken_for_centre_padding(
    tmp_path: Path, shapes_tensors: dict[str, torch.Tensor]
) -> None:
    steps = [{"DetectionBottomRightPadding": {"output_shape": (640, 640), "pad_value": 114}}]
    params = {"image_processor": {"ComposeProcessing": {"processings": steps}}}
    torch.save({"net": shapes_tensors, "processing_params": params}, tmp_path / "br.pth")
    assert load_checkpoint(tmp_path / "br.pth").processing is None


def test_safetensors_processing_keys_and_metadata_checks(
    tmp_path: Path, shapes_tensors: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "custom.safetensors"
    save_file(shapes_tensors, path, metadata={"processing_resize": "636", "processing_imgsz": "640"})
    checkpoint = load_checkpoint(path)
    assert checkpoint.processing == {"resize": 636, "imgsz": 640, "pad_value": 114}
    assert checkpoint.class_names is None

    save_file(shapes_tensors, path, metadata={"classes": "a,b,c"})
    with pytest.raises(NasquantError, match=r"records 3 class names, but its class head has 6"):
        load_checkpoint(path)
    save_file(shapes_tensors, path, metadata={"arch": "yolo_nas_l"})
    with pytest.raises(NasquantError, match=r"yolo_nas_l.*tensors are yolo_nas_s"):
        load_checkpoint(path)


def test_folder_with_one_checkpoint(tmp_path: Path, shapes_safetensors: Path) -> None:
    shutil.copy(shapes_safetensors, tmp_path / "best.safetensors")
    (tmp_path / "notes.txt").write_text("not weights")
    assert load_checkpoint(tmp_path).path == tmp_path / "best.safetensors"
    (tmp_path / "other.pt").write_bytes(b"")
    with pytest.raises(NasquantError, match=r"several checkpoints \(best.safetensors, other.pt\)"):
        load_checkpoint(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NasquantError, match=r"no checkpoint \(.pt/.pth/.safetensors\) in folder .*empty"):
        load_checkpoint(empty)


def _one_line(exc: pytest.ExceptionInfo[NasquantError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NasquantError, match=r"^no such checkpoint file: .*nope\.pt") as exc:
        load_checkpoint(tmp_path / "nope.pt")
    assert "yolo_nas_s" in _one_line(exc)  # says what else would have been accepted


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("notes.pt", b"these are not weights\n", "it is a text file"),
        ("photo.pt", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(64), "it is a JPEG image"),
        ("empty.pth", b"", "the file is empty"),
        ("lfs.pth", b"version https://git-lfs.github.com/spec/v1\noid sha256:c1b1\n", "Git LFS pointer"),
        ("page.pt", b"<!DOCTYPE html><html>Not Found</html>", "HTML"),
        ("random.pth", bytes(range(1, 40)) * 4, "unknown format"),
    ],
)
def test_non_checkpoint_files_are_named_and_explained(
    tmp_path: Path, name: str, content: bytes, reason: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(NasquantError, match="is not a readable YOLO-NAS checkpoint") as exc:
        load_checkpoint(path)
    message = _one_line(exc)
    assert str(path) in message and reason in message


def test_truncated_zip(tmp_path: Path, shapes_tensors: dict[str, torch.Tensor]) -> None:
    whole = tmp_path / "whole.pth"
    torch.save({"net": shapes_tensors}, whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(NasquantError, match=r"cut\.pth is not a readable .*truncated zip") as exc:
        load_checkpoint(cut)
    _one_line(exc)


def test_damaged_zip_record(tmp_path: Path, shapes_tensors: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "flipped.pth"
    torch.save({"net": shapes_tensors}, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a tensor record: the zip CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(NasquantError, match=r"flipped\.pth is not a readable YOLO-NAS checkpoint") as exc:
        load_checkpoint(path)
    _one_line(exc)


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda raw: raw[:8] + b"{not json" + raw[17:], "bad safetensors file"),
        (lambda raw: raw[: len(raw) // 2], "bad safetensors file"),
        (lambda raw: (10**12).to_bytes(8, "little") + raw[8:], "bad safetensors file"),
    ],
    ids=["bad-json", "truncated", "huge-header-length"],
)
def test_corrupt_safetensors(tmp_path: Path, shapes_safetensors: Path, mangle, reason: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(mangle(shapes_safetensors.read_bytes()))
    with pytest.raises(
        NasquantError, match=rf"bad\.safetensors is not a readable YOLO-NAS checkpoint \({reason}"
    ) as exc:
        load_checkpoint(path)
    _one_line(exc)


def test_readable_file_without_yolo_nas_tensors(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}, path)
    with pytest.raises(
        NasquantError, match=r"resnet\.pth: not a YOLO-NAS state dict: 2 tensors, but no backbone"
    ):
        load_checkpoint(path)

    torch.save({"optimizer": {"lr": 0.1}, "epoch": 3}, path)
    with pytest.raises(NasquantError, match=r"no state dict or model inside; it holds optimizer, epoch"):
        load_checkpoint(path)


def test_wrong_shapes_are_not_a_variant(tmp_path: Path, shapes_tensors: dict[str, torch.Tensor]) -> None:
    odd = dict(shapes_tensors)
    odd["heads.head1.stem.seq.conv.weight"] = torch.zeros(72, 96, 1, 1)
    torch.save(odd, tmp_path / "odd.pth")
    with pytest.raises(NasquantError, match=r"odd\.pth: tensors match no YOLO-NAS variant .*head width 72"):
        load_checkpoint(tmp_path / "odd.pth")


def test_explicit_variant_and_classes_are_checked(shapes_safetensors: Path) -> None:
    with pytest.raises(NasquantError) as exc:
        load_checkpoint(shapes_safetensors, variant="yolo_nas_m")
    message = _one_line(exc)
    assert "yolo_nas_s weights (6 classes)" in message and "yolo_nas_m was requested" in message
    assert str(shapes_safetensors) in message

    with pytest.raises(NasquantError, match=r"with 6 classes, but num_classes=80 was requested"):
        load_checkpoint(shapes_safetensors, num_classes=80)
    with pytest.raises(
        NasquantError,
        match=r"unknown YOLO-NAS variant 'x'; expected one of yolo_nas_s, yolo_nas_m, yolo_nas_l",
    ):
        load_checkpoint(shapes_safetensors, variant="x")

    for spelling in ("s", "S", "yolo-nas-s", "yolo_nas_s"):
        assert load_checkpoint(shapes_safetensors, variant=spelling, num_classes=6).variant == "yolo_nas_s"


def test_pinned_sha256_of_a_local_file(shapes_safetensors: Path) -> None:
    good = "edc8b826cb0af1136028a899e3ffa2c0e21e2d6dd4dc7372431704dd2f539541"
    assert load_checkpoint(shapes_safetensors, sha256=good.upper()).sha256 == good
    with pytest.raises(NasquantError, match=rf"has sha256 {good}, but 0+ was pinned"):
        load_checkpoint(shapes_safetensors, sha256="0" * 64)


def _reparameterized(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What re-parameterization leaves: QARepVGG branches and post-BN merged into rbr_reparam."""
    dropped = (".branch_3x3.", ".branch_1x1.", ".post_bn.")
    return {k: v for k, v in state_dict.items() if not any(part in k for part in dropped)}


def _bn_folded(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Conv+BN folded: every ``X.bn.*`` disappears and ``X.conv.bias`` appears."""
    out = {}
    for key, value in state_dict.items():
        if ".bn." in key:
            if key.endswith(".bn.weight"):
                out[key.replace(".bn.weight", ".conv.bias")] = torch.zeros(value.shape)
            continue
        out[key] = value
    return out


@pytest.mark.parametrize("variant", ["yolo_nas_s", "yolo_nas_m", "yolo_nas_l"])
@pytest.mark.parametrize("form", ["unfused", "reparameterized", "folded"])
def test_variant_inference_from_the_golden_layouts(variant: str, form: str, manifest: dict) -> None:
    state_dict = synthetic_state_dict(manifest[variant], num_classes=80)
    if form != "unfused":
        state_dict = _reparameterized(state_dict)
    if form == "folded":
        state_dict = _bn_folded(state_dict)
        assert not any(".bn." in key for key in state_dict)
    assert infer_variant(state_dict) == variant


def test_key_count_alone_does_not_decide(manifest: dict) -> None:
    # An S layout padded with extra keys to M's count is still S: shapes decide.
    state_dict = synthetic_state_dict(manifest["yolo_nas_s"])
    for i in range(len(manifest["yolo_nas_m"]) - len(state_dict)):
        state_dict[f"extra.{i}"] = torch.zeros(1)
    assert infer_variant(state_dict) == "yolo_nas_s"


def test_inconsistent_heads_are_rejected(manifest: dict) -> None:
    state_dict = synthetic_state_dict(manifest["yolo_nas_m"])
    state_dict["heads.head3.cls_pred.weight"] = torch.zeros(6, 384, 1, 1)
    with pytest.raises(NasquantError, match=r"heads disagree on the class count \(\[6, 80\]\)"):
        infer_variant(state_dict)
