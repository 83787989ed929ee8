from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from nasquant.data.preprocess import ImageTransform, Preprocess, preprocess, read_image, resized_size
from nasquant.errors import NasquantError
from tests.shared import shared_path


def _coco_mini_images() -> dict[str, Path]:
    """Real COCO images of each shape class: portrait, landscape, square-ish, small."""
    root = shared_path("data", "coco-mini")
    images = json.loads((root / "annotations" / "instances_val2017.json").read_text())["images"]
    portrait = next(i for i in images if i["height"] > i["width"])
    landscape = next(i for i in images if i["width"] > 1.4 * i["height"])
    squarest = min(images, key=lambda i: abs(i["width"] - i["height"]))
    smallest = min(images, key=lambda i: i["width"] * i["height"])
    return {
        name: root / "val2017" / info["file_name"]
        for name, info in [
            ("portrait", portrait),
            ("landscape", landscape),
            ("square", squarest),
            ("small", smallest),
        ]
    }


@pytest.fixture(scope="module")
def coco_images() -> dict[str, np.ndarray]:
    return {name: read_image(path) for name, path in _coco_mini_images().items()}


def _random_boxes(rng: np.random.Generator, height: int, width: int, n: int = 50) -> np.ndarray:
    x = np.sort(rng.uniform(0, width, (n, 2)), axis=1)
    y = np.sort(rng.uniform(0, height, (n, 2)), axis=1)
    return np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)


# --------------------------------------------------------------------------------------------------
# protocols


def test_sg_protocol_is_636_in_640_rounded_down():
    spec = Preprocess.from_protocol("sg", 640)
    assert spec == Preprocess(imgsz=640, resize=636, pad_value=114, rounding="floor")
    assert Preprocess.from_protocol("sg", 320).resize == 318


def test_sg_protocol_uses_the_checkpoint_processing_scaled_to_imgsz():
    recorded = {"resize": 636, "imgsz": 640, "pad_value": 114}
    assert Preprocess.from_protocol("sg", 640, model_processing=recorded).resize == 636
    assert Preprocess.from_protocol("sg", 320, model_processing=recorded).resize == 318
    shapes = {"resize": 320, "imgsz": 320, "pad_value": 100}
    spec = Preprocess.from_protocol("sg", 320, model_processing=shapes)
    # super-gradients' DetectionLongestMaxSizeRescale, the step such checkpoints record, rounds the
    # resized size to nearest (its COCO dataset, Deci's published protocol, floors).
    assert (spec.resize, spec.pad_value, spec.rounding) == (320, 100, "round")
    assert Preprocess.from_protocol("sg", 640, model_processing=shapes).resize == 640


@pytest.mark.parametrize(
    ("height", "rounded", "floored"), [(337, 216, 215), (335, 214, 214), (500, 320, 320)]
)
def test_recorded_processing_resizes_as_super_gradients_predict_does(
    height: int, rounded: int, floored: int
) -> None:
    # super-gradients: scale = min(out_h / h, out_w / w); new = round(h * scale), round(w * scale)
    recorded = Preprocess.from_protocol(
        "sg", 320, model_processing={"resize": 320, "imgsz": 320, "pad_value": 114}
    )
    assert resized_size(height, 500, recorded) == (rounded, 320)
    assert resized_size(height, 500, Preprocess(320, 320, 114, "floor")) == (floored, 320)


def test_letterbox_protocol():
    assert Preprocess.from_protocol("letterbox", 640) == Preprocess(640, 640, 114, "round")


def test_unknown_protocol_lists_the_allowed_ones():
    with pytest.raises(NasquantError, match="sg, letterbox"):
        Preprocess.from_protocol("yolox", 640)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"imgsz": 0, "resize": 0},
        {"imgsz": 640, "resize": 641},
        {"imgsz": 640, "resize": 636, "pad_value": 300},
        {"imgsz": 640, "resize": 636, "rounding": "ceil"},
    ],
)
def test_invalid_specs_are_user_errors(kwargs):
    with pytest.raises(NasquantError):
        Preprocess(**kwargs)


# --------------------------------------------------------------------------------------------------
# the image itself


def _sg_reference(image: np.ndarray, resize: int, canvas: int) -> np.ndarray:
    """super-gradients' COCO dataset + DetectionPadToSize + /255 + HWC->CHW, written out plainly."""
    r = min(resize / image.shape[0], resize / image.shape[1])
    size = (int(image.shape[1] * r), int(image.shape[0] * r))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    out = np.full((canvas, canvas, 3), 114, dtype=np.uint8)
    top, left = (canvas - resized.shape[0]) // 2, (canvas - resized.shape[1]) // 2
    out[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    return (out / 255.0).astype(np.float32).transpose(2, 0, 1)


@pytest.mark.parametrize("name", ["portrait", "landscape", "square", "small"])
def test_sg_protocol_matches_super_gradients_bit_for_bit(coco_images, name):
    image = coco_images[name]
    tensor, transform = preprocess(image, Preprocess.from_protocol("sg", 640))
    assert tensor.dtype == np.float32 and tensor.shape == (3, 640, 640) and tensor.flags.c_contiguous
    np.testing.assert_array_equal(tensor, _sg_reference(image, 636, 640))
    assert max(transform.new_h, transform.new_w) == 636


def test_resized_size_rounding_floor_vs_round():
    image = np.zeros((301, 500, 3), dtype=np.uint8)  # 301 * 636 / 500 = 382.87
    _, floor = preprocess(image, Preprocess(640, 636, rounding="floor"))
    _, nearest = preprocess(image, Preprocess(640, 636, rounding="round"))
    assert (floor.new_h, floor.new_w) == (382, 636)
    assert (nearest.new_h, nearest.new_w) == (383, 636)


def test_floor_keeps_super_gradients_float_quirk():
    # int(149 * (636 / 149)) is 635 in floating point; super-gradients resizes to 635, so do we.
    image = np.zeros((149, 100, 3), dtype=np.uint8)
    _, transform = preprocess(image, Preprocess(640, 636))
    assert transform.new_h == int(149 * (636 / 149)) == 635


def test_padding_is_centred_and_uses_pad_value():
    image = np.full((100, 50, 3), 7, dtype=np.uint8)
    tensor, transform = preprocess(image, Preprocess(64, 64, pad_value=114, rounding="round"))
    assert (transform.new_h, transform.new_w, transform.pad_top, transform.pad_left) == (64, 32, 0, 16)
    content = np.zeros((64, 64), dtype=bool)
    content[:, 16:48] = True
    np.testing.assert_array_equal(tensor[:, content], np.float32(7) / np.float32(255))
    np.testing.assert_array_equal(tensor[:, ~content], np.float32(114) / np.float32(255))


def test_no_resize_when_the_long_side_already_fits():
    # The shapes images have long side 320: at 320 input only padding happens, pixels untouched.
    path = sorted(shared_path("data", "shapes", "val", "images").glob("*.jpg"))[0]
    image = read_image(path)
    assert max(image.shape[:2]) == 320
    spec = Preprocess.from_protocol("sg", 320, model_processing={"resize": 320, "imgsz": 320})
    tensor, t = preprocess(image, spec)
    assert (t.new_h, t.new_w) == image.shape[:2]
    crop = tensor[:, t.pad_top : t.pad_top + t.new_h, t.pad_left : t.pad_left + t.new_w]
    np.testing.assert_array_equal(crop, image.transpose(2, 0, 1).astype(np.float32) / np.float32(255))


def test_preprocess_rejects_non_rgb_uint8():
    with pytest.raises(NasquantError, match="RGB uint8"):
        preprocess(np.zeros((10, 10), dtype=np.uint8), Preprocess(32, 32))
    with pytest.raises(NasquantError, match="RGB uint8"):
        preprocess(np.zeros((10, 10, 3), dtype=np.float32), Preprocess(32, 32))


# --------------------------------------------------------------------------------------------------
# box mapping


@pytest.mark.parametrize(
    "protocol, imgsz", [("sg", 640), ("letterbox", 640), ("letterbox", 1280), ("sg", 320)]
)
@pytest.mark.parametrize("name", ["portrait", "landscape", "square", "small"])
def test_box_mapping_inverts_exactly_on_real_images(coco_images, protocol, imgsz, name):
    image = coco_images[name]
    _, transform = preprocess(image, Preprocess.from_protocol(protocol, imgsz))
    boxes = _random_boxes(np.random.default_rng(0), *image.shape[:2])
    np.testing.assert_allclose(transform.to_original(transform.to_input(boxes)), boxes, rtol=0, atol=1e-9)
    as_float32 = boxes.astype(np.float32)
    back = transform.to_original(transform.to_input(as_float32))
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, as_float32, rtol=0, atol=1e-3)


def test_upscaled_small_images_invert_exactly():
    # shapes images (long side 320) into a 640 canvas: the scale is > 1.
    path = sorted(shared_path("data", "shapes", "val", "images").glob("*.jpg"))[0]
    image = read_image(path)
    for protocol in ("sg", "letterbox"):
        _, transform = preprocess(image, Preprocess.from_protocol(protocol, 640))
        assert max(transform.new_h, transform.new_w) > max(image.shape[:2])
        boxes = _random_boxes(np.random.default_rng(1), *image.shape[:2])
        np.testing.assert_allclose(transform.to_original(transform.to_input(boxes)), boxes, atol=1e-9)


def test_whole_image_maps_onto_the_content_rectangle(coco_images):
    image = coco_images["portrait"]
    h, w = image.shape[:2]
    _, t = preprocess(image, Preprocess.from_protocol("sg", 640))
    full = np.array([[0, 0, w, h]], dtype=np.float64)
    np.testing.assert_allclose(
        t.to_input(full), [[t.pad_left, t.pad_top, t.pad_left + t.new_w, t.pad_top + t.new_h]], atol=1e-9
    )


def test_mapped_box_lands_where_the_pixels_went():
    # A white rectangle on black: after preprocessing, the white pixels sit inside to_input(box).
    image = np.zeros((300, 500, 3), dtype=np.uint8)
    box = np.array([[120.0, 60.0, 260.0, 200.0]])
    image[60:200, 120:260] = 255
    for protocol in ("sg", "letterbox"):
        tensor, t = preprocess(image, Preprocess.from_protocol(protocol, 640))
        ys, xs = np.nonzero(tensor[0] > 0.5)
        x1, y1, x2, y2 = t.to_input(box)[0]
        assert abs(xs.min() - x1) <= 1 and abs(xs.max() + 1 - x2) <= 1
        assert abs(ys.min() - y1) <= 1 and abs(ys.max() + 1 - y2) <= 1


def test_to_original_clips_to_the_image():
    t = ImageTransform(orig_h=100, orig_w=200, new_h=50, new_w=100, pad_top=25, pad_left=0)
    out = t.to_original(np.array([[-10.0, 0.0, 120.0, 90.0]], dtype=np.float32))
    np.testing.assert_allclose(out, [[0, 0, 200, 100]])
    assert t.to_original(np.zeros((0, 4), dtype=np.float32)).shape == (0, 4)


# --------------------------------------------------------------------------------------------------
# reading


def test_read_image_returns_rgb(tmp_path):
    bgr = np.zeros((4, 6, 3), dtype=np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    rgb = read_image(tmp_path / "red.png")
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == 255).all() and (rgb[..., 1:] == 0).all()


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(NasquantError, match="not found.*missing.jpg"):
        read_image(tmp_path / "missing.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(NasquantError, match="broken.jpg"):
        read_image(tmp_path / "broken.jpg")
