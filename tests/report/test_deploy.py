"""DEPLOY.md text for the two preprocessing protocols and both batch kinds."""

from __future__ import annotations

from pathlib import Path

from nasquant.data.preprocess import Preprocess
from nasquant.export.engine_plan import EngineSettings, Profile
from nasquant.report.deploy import render_deploy_guide
from nasquant.settings import NMSSettings


def _guide(settings: EngineSettings, spec: Preprocess, **extra) -> str:
    return render_deploy_guide(
        fp32_onnx=Path("model.fp32.onnx"),
        int8_onnx=Path("model.int8.trt.onnx"),
        settings=settings,
        spec=spec,
        nms=NMSSettings(conf=0.25, iou=0.6, top_k=500, max_det=100, multi_label=False),
        class_names=["person", "car"],
        skipped_layers=["heads.head1.reg_pred"],
        **extra,
    )


def test_a_dynamic_batch_letterbox_guide() -> None:
    profile = Profile("images", (1, 3, 640, 640), (4, 3, 640, 640), (8, 3, 640, 640))
    guide = _guide(EngineSettings("int8", profile), Preprocess.from_protocol("letterbox", 640))
    assert "N x 3 x 640 x 640 (dynamic batch, min/opt/max 1/4/8)" in guide
    assert "`round(h * scale) x round(w * scale)`" in guide  # Ultralytics' rounding
    assert "--maxShapes=images:8x3x640x640" in guide
    assert "(best class per anchor only)" in guide and "keep the 500 highest" in guide
    assert "N x A x 2, per-class probabilities" in guide and "0: person, 1: car" in guide
    assert "`heads.head1.reg_pred`" in guide


def test_a_fixed_batch_super_gradients_guide() -> None:
    guide = _guide(EngineSettings("int8"), Preprocess.from_protocol("sg", 640), fixed_batch=1)
    assert "N x 3 x 640 x 640 (fixed batch N = 1)" in guide
    assert "longer side is 636 px" in guide and "(rounded down)" in guide
    assert "Shapes=" not in guide
