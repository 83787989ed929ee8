"""Per-layer sensitivity and the ``skip: auto`` search on the shapes fixture (real calibration, real
images, real mAP). The analysis runs on the heads' convs only, to keep the tests quick."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from nasquant import NAS
from nasquant.data.calibration import select_calibration_images
from nasquant.data.datasets import iter_batches, load_dataset
from nasquant.errors import NasquantError
from nasquant.eval.validate import validate
from nasquant.quant.sensitivity import analyze, conv_layers, search_fp_layers, sqnr_db
from nasquant.runtime import TorchBackend
from tests.shared import shared_path


@pytest.fixture(scope="module")
def sample(shapes_nas: NAS) -> np.ndarray:
    val = load_dataset(shared_path("data", "shapes", "val", "annotations.json"))
    chosen = select_calibration_images(val, num_images=4, seed=0)
    return np.concatenate([b.images for b in iter_batches(chosen, shapes_nas.preprocessing(), 4)])


@pytest.fixture(scope="module")
def head_convs(calibrated: torch.nn.Module) -> list[str]:
    return [name for name in conv_layers(calibrated) if name.startswith("heads.")]


@pytest.fixture(scope="module")
def evaluate(shapes_nas: NAS):
    val = load_dataset(shared_path("data", "shapes", "val", "annotations.json"))
    subset = val.first(12)

    def evaluate(model: torch.nn.Module) -> float:
        backend = TorchBackend(model, device="cpu")
        return validate(backend, subset, shapes_nas.preprocessing(), batch_size=6, progress=False)["map50_95"]

    return evaluate


def test_sqnr() -> None:
    signal = np.array([3.0, 4.0])
    assert sqnr_db(signal, signal) == float("inf")
    assert sqnr_db(signal, signal + np.array([0.0, 0.5])) == pytest.approx(10 * np.log10(25 / 0.25))


def test_every_conv_is_a_unit(calibrated: torch.nn.Module, head_convs: list[str]) -> None:
    assert len(conv_layers(calibrated)) == 100  # 98 convs + 2 transposed convs of YOLO-NAS-S
    assert len(head_convs) == 15


def test_the_ranking_is_deterministic(
    shapes_nas: NAS, calibrated: torch.nn.Module, sample: np.ndarray, head_convs: list[str]
) -> None:
    first = analyze(shapes_nas.model, calibrated, sample, layers=head_convs, progress=False)
    second = analyze(shapes_nas.model, calibrated, sample, layers=head_convs, progress=False)
    assert first.ranked() == second.ranked() and sorted(first.ranked()) == sorted(head_convs)
    assert [layer.recovery_db for layer in first.layers] == [layer.recovery_db for layer in second.layers]
    recoveries = [layer.recovery_db for layer in first.layers]
    assert recoveries == sorted(recoveries, reverse=True)
    assert np.isfinite(first.all_int8_boxes_db) and first.all_int8_logits_db > 10


def test_a_sabotaged_quantizer_ranks_first(
    shapes_nas: NAS, calibrated: torch.nn.Module, sample: np.ndarray, head_convs: list[str]
) -> None:
    clean = analyze(shapes_nas.model, calibrated, sample, layers=head_convs, progress=False)
    # The clean ranking's last layer, whatever this machine's float rounding makes it: sabotaging it must
    # move it from last to first (a fixed choice can already rank first on another CPU).
    victim = clean.ranked()[-1]
    sabotaged = copy.deepcopy(calibrated)
    quantizer = dict(sabotaged.named_modules())[victim].input_quantizer
    quantizer.amax = quantizer.amax * 1e-3  # clips almost every activation of this layer
    result = analyze(shapes_nas.model, sabotaged, sample, layers=head_convs, progress=False)
    assert result.ranked()[0] == victim
    assert min(result.layers, key=lambda layer: layer.damage_db).name == victim
    assert result.layers[0].recovery_db > 3 * max(layer.recovery_db for layer in result.layers[1:])


def test_the_search_respects_max_fp_layers(
    shapes_nas: NAS, calibrated: torch.nn.Module, sample: np.ndarray, head_convs: list[str], evaluate
) -> None:
    result = analyze(
        shapes_nas.model, calibrated, sample, layers=head_convs, evaluate=evaluate, top_k=2, progress=False
    )
    assert result.map50_95_fp32 is not None and result.layers[0].map50_95_kept_float is not None
    assert result.layers[2].map50_95_kept_float is None  # only the top 2 get a real mAP
    # An unreachable budget: every prefix up to the limit is tried, none more.
    search = search_fp_layers(
        calibrated, result, evaluate, max_map_drop=-1.0, max_fp_layers=2, log=lambda _: None
    )
    assert [len(t["fp_layers"]) for t in search["tried"]] == [0, 1, 2]
    assert not search["met"] and len(search["chosen"]) <= 2
    # Only a layer count: the top layers by recovery, verified once.
    fixed = search_fp_layers(
        calibrated, result, evaluate, max_map_drop=None, max_fp_layers=2, log=lambda _: None
    )
    assert fixed["met"] and fixed["chosen"] == result.ranked()[:2] and len(fixed["tried"]) == 1
    # A budget all-INT8 already meets: nothing is kept in FP.
    easy = search_fp_layers(
        calibrated, result, evaluate, max_map_drop=1.0, max_fp_layers=None, log=lambda _: None
    )
    assert easy["met"] and easy["chosen"] == []
    with pytest.raises(NasquantError, match="needs max_map_drop and/or max_fp_layers"):
        search_fp_layers(calibrated, result, evaluate, max_map_drop=None, max_fp_layers=None)
