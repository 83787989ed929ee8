"""Quantization-aware distillation on the calibrated shapes fixture: a few steps on a few images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from modelopt.torch.quantization.nn import TensorQuantizer
from torch import nn

from nasquant import NAS
from nasquant.data.calibration import select_calibration_images
from nasquant.data.datasets import iter_batches, load_dataset
from nasquant.errors import NasquantError
from nasquant.quant import keep_in_float
from nasquant.quant.distill import (
    distill,
    distillation_loss,
    head_outputs,
    learned_ranges,
    mean_distillation_loss,
)
from nasquant.settings import BOX_BRANCH_LAYERS
from tests.shared import shared_path


@pytest.fixture(scope="module")
def batches(shapes_nas: NAS) -> list[np.ndarray]:
    chosen = select_calibration_images(load_dataset(shared_path("data", "shapes", "calib")), num_images=8)
    return [batch.images for batch in iter_batches(chosen, shapes_nas.preprocessing(), 4)]


def test_the_loss_is_zero_exactly_when_the_outputs_match(shapes_nas: NAS, batches: list[np.ndarray]) -> None:
    assert mean_distillation_loss(shapes_nas.model, shapes_nas.model, batches[:1]) == pytest.approx(
        0.0, abs=1e-7
    )
    with head_outputs(shapes_nas.model) as outputs, torch.no_grad():
        shapes_nas.model(torch.from_numpy(batches[0]))
    shifted = [(box + 0.5, cls) for box, cls in outputs]
    assert float(distillation_loss(shifted, outputs)) == pytest.approx(0.0, abs=1e-6)  # softmax: shift-free
    assert float(distillation_loss([(box, cls - 1) for box, cls in outputs], outputs)) > 0
    assert float(distillation_loss([(box * 2, cls) for box, cls in outputs], outputs)) > 0


def test_distillation_moves_the_quantized_model_toward_the_float_one(
    shapes_nas: NAS, calibrated: nn.Module, batches: list[np.ndarray]
) -> None:
    selective = keep_in_float(calibrated, list(BOX_BRANCH_LAYERS))[0]
    before = {name: t.clone() for name, t in selective.state_dict().items()}
    result = distill(selective, shapes_nas.model, batches, steps=4, learning_rate=1e-5, progress=False)
    assert len(result.losses) == 4 and all(np.isfinite(result.losses))
    # the input model is untouched; the copy's weights moved and its calibrated ranges did not
    assert all(torch.equal(t, before[name]) for name, t in selective.state_dict().items())
    tuned = result.model.state_dict()
    ranges = [name for name in tuned if name.endswith("_amax")]
    assert ranges and all(torch.equal(tuned[name], before[name]) for name in ranges)
    assert not torch.equal(
        tuned["backbone.stem.conv.rbr_reparam.weight"], before["backbone.stem.conv.rbr_reparam.weight"]
    )
    assert not any(p.requires_grad for p in result.model.parameters())
    # on the images it trained on, closer to the float model than the calibrated model was
    assert mean_distillation_loss(result.model, shapes_nas.model, batches) < mean_distillation_loss(
        selective, shapes_nas.model, batches
    )
    # the same seed, the same steps: the first two (at the initial learning rate on any schedule) again
    again = distill(selective, shapes_nas.model, batches, steps=2, learning_rate=1e-5, progress=False)
    assert again.losses == result.losses[:2]


def test_bad_requests_are_refused(shapes_nas: NAS, calibrated: nn.Module, batches: list[np.ndarray]) -> None:
    with pytest.raises(NasquantError, match="at least one step"):
        distill(calibrated, shapes_nas.model, batches, steps=0, learning_rate=1e-5)
    with pytest.raises(NasquantError, match="no images"):
        distill(calibrated, shapes_nas.model, [], steps=1, learning_rate=1e-5)
    with pytest.raises(NasquantError, match="at least one image"):
        mean_distillation_loss(calibrated, shapes_nas.model, [])
    with pytest.raises(NasquantError, match="no detection head"):
        distill(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), batches, steps=1, learning_rate=1e-5)


def test_learned_ranges_start_at_the_calibrated_ones_and_learn(
    shapes_nas: NAS, calibrated: nn.Module, batches: list[np.ndarray]
) -> None:
    selective = keep_in_float(calibrated, list(BOX_BRANCH_LAYERS))[0]
    quantizers = {
        name: module
        for name, module in selective.named_modules()
        if isinstance(module, TensorQuantizer) and module.amax is not None
    }
    before = {name: q.amax.clone() for name, q in quantizers.items()}
    fixed_loss = mean_distillation_loss(selective, shapes_nas.model, batches)
    with learned_ranges(selective) as ranges:
        learned = {name for name, q in quantizers.items() if hasattr(q, "log_amax")}
        assert learned == {name for name, q in quantizers.items() if q.is_enabled}
        assert learned != set(quantizers)  # the box branch's quantizers are off and stay out
        assert len(ranges) == len(learned) and all(r.requires_grad for r in ranges)
        # the same grid, computed through ModelOpt's rounding with a straight-through estimator: the
        # model is as far from the float one as with ModelOpt's own fake quantizer (rounding ties aside)
        assert mean_distillation_loss(selective, shapes_nas.model, batches) == pytest.approx(
            fixed_loss, rel=0.05
        )
    # closed untrained: the calibrated ranges come back, the parameters and the backend are gone
    for name, quantizer in quantizers.items():
        assert torch.equal(quantizer.amax, before[name])
        assert quantizer.backend is None and not hasattr(quantizer, "log_amax")

    result = distill(
        selective,
        shapes_nas.model,
        batches,
        steps=4,
        learning_rate=1e-5,
        range_learning_rate=1e-3,
        progress=False,
    )
    tuned = {name: q for name, q in result.model.named_modules() if name in quantizers}
    moved = {name for name, q in tuned.items() if not torch.equal(q.amax, before[name])}
    assert moved and moved <= learned  # only enabled quantizers learn, and they did
    assert all(q.backend is None and not hasattr(q, "log_amax") for q in tuned.values())
    assert all(torch.equal(q.amax, before[name]) for name, q in quantizers.items())  # the input model kept
    assert mean_distillation_loss(result.model, shapes_nas.model, batches) < fixed_loss
