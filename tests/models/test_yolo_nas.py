"""Architecture parity with super-gradients 3.7.1 via the golden manifests and reference outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nasquant.errors import NasquantError
from nasquant.models import VARIANTS, yolo_nas
from nasquant.models.layers import QARepVGGBlock
from tests.checkpoints import deterministic_state_dict
from tests.shared import shared_path


def _manifest(variant: str) -> list[list]:
    with open(shared_path("golden", "state_dict_manifest.json")) as f:
        return json.load(f)[variant]


def _golden_model(variant: str) -> torch.nn.Module:
    model = yolo_nas(variant)
    model.load_state_dict(deterministic_state_dict(variant), strict=True)
    return model.eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_matches_super_gradients_manifest(variant: str) -> None:
    ours = [
        [key, list(t.shape), str(t.dtype).removeprefix("torch.")]
        for key, t in yolo_nas(variant).state_dict().items()
    ]
    assert ours == _manifest(variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_match_golden_reference_unfused_and_fused(variant: str) -> None:
    reference = np.load(shared_path("golden", f"{variant}_reference.npz"))
    images = torch.from_numpy(np.load(shared_path("golden", "yolo_nas_s_reference.npz"))["input"])
    model = _golden_model(variant)
    with torch.no_grad():
        boxes, scores = model(images)
        np.testing.assert_allclose(boxes.numpy(), reference["pred_bboxes"], rtol=0, atol=1e-3)
        np.testing.assert_allclose(scores.numpy(), reference["pred_scores"], rtol=0, atol=1e-5)
        fused_boxes, fused_scores = model.fuse()(images)
    assert model.is_fused
    np.testing.assert_allclose(fused_boxes.numpy(), reference["pred_bboxes_fused"], rtol=0, atol=1e-3)
    np.testing.assert_allclose(fused_scores.numpy(), reference["pred_scores_fused"], rtol=0, atol=1e-5)


def test_fuse_leaves_only_convs_with_bias_and_keeps_layer_names() -> None:
    model = yolo_nas("yolo_nas_s", num_classes=6).eval().fuse()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    convs = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert all(conv.bias is not None for conv in convs.values())
    assert "backbone.stem.conv.rbr_reparam" in convs and "heads.head1.cls_pred" in convs
    assert convs["heads.head1.cls_pred"].out_channels == 6


@pytest.mark.parametrize("layout", ["partial", "fused"])
def test_reparameterized_state_dicts_load_strictly_into_a_fresh_model(layout: str) -> None:
    source = _golden_model("yolo_nas_s")
    images = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        expected = source(images)
    if layout == "partial":
        # super-gradients' default prep_model_for_conversion: branches merged, post_bn kept
        for module in source.modules():
            if isinstance(module, QARepVGGBlock):
                module.reparameterize(keep_post_bn=True)
    else:
        source.fuse()
    target = yolo_nas("yolo_nas_s").eval()
    state = source.state_dict()
    target.adopt_layout(state).load_state_dict(state, strict=True)
    with torch.no_grad():
        boxes, scores = target(images)
    torch.testing.assert_close(boxes, expected[0], rtol=0, atol=1e-3)
    torch.testing.assert_close(scores, expected[1], rtol=0, atol=1e-5)


def test_any_input_size_multiple_of_32_gives_one_anchor_per_cell() -> None:
    with torch.no_grad():
        boxes, scores = yolo_nas("s", num_classes=3).eval()(torch.rand(2, 3, 64, 96))
    anchors = sum((64 // s) * (96 // s) for s in (8, 16, 32))
    assert boxes.shape == (2, anchors, 4) and scores.shape == (2, anchors, 3)


def test_unknown_variant_names_the_allowed_ones() -> None:
    with pytest.raises(NasquantError, match="yolo_nas_s, yolo_nas_m, yolo_nas_l"):
        yolo_nas("yolo_nas_xl")
