"""Which layers carry the INT8 error: per-layer sensitivity and the search behind ``skip: auto``.

One calibration serves every measurement: a layer is "quantized" or "kept in floating point" by
enabling or disabling its own input and weight quantizers on a single calibrated copy, so nothing is
recalibrated per layer. For every conv:

* **damage**: the output SQNR (dB, boxes and class logits against FP32) with *only* that layer INT8;
* **recovery**: how many dB the SQNR gains over all-INT8 when *only* that layer is kept in FP.

Both are measured on a fixed sample of validation images (calibration-disjoint: the pipeline refuses
overlapping sets), so the cost is two forward passes of the sample per layer: linear in layers, with
the sample size as the knob. The ``top_k`` layers by recovery also get a real mAP (all INT8 but that
layer) on the validation subset. The search (:func:`search_fp_layers`) is greedy by recovery and
verified by a real mAP evaluation of every prefix it tries; it stops at the smallest prefix that meets
the budget.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from nasquant.errors import NasquantError
from nasquant.quant.calibrate import quantized_layers

#: probabilities are clipped to [EPS, 1 - EPS] before the logit, so saturated scores stay finite
LOGIT_EPS = 1e-6

#: ``evaluate(model) -> mAP50-95`` on the validation subset
Evaluate = Callable[[nn.Module], float]


@dataclass
class LayerSensitivity:
    """One conv's measurements (SQNR in dB; higher is closer to FP32)."""

    name: str
    only_boxes_db: float
    only_logits_db: float
    all_but_boxes_db: float
    all_but_logits_db: float
    recovery_db: float
    """Mean SQNR gain over all-INT8 when this layer alone stays FP (boxes and logits averaged)."""
    map50_95_kept_float: float | None = None
    """mAP with every layer INT8 but this one (the ``top_k`` layers by recovery only)."""

    @property
    def damage_db(self) -> float:
        """SQNR with only this layer INT8, of the output it disturbs most (lower = more damage); a
        class-branch layer leaves the boxes exact (infinite SQNR), so a mean would hide it."""
        return min(self.only_boxes_db, self.only_logits_db)


@dataclass
class SensitivityResult:
    """Everything measured: the baselines, one entry per conv (ranked by recovery), the cost."""

    layers: list[LayerSensitivity]
    all_int8_boxes_db: float
    all_int8_logits_db: float
    samples: int
    seconds: float
    map50_95_fp32: float | None = None
    map50_95_int8: float | None = None
    map_images: int | None = None
    """Validation images behind the mAP values (recorded by the caller that owns ``evaluate``)."""
    search: dict | None = field(default=None)

    def ranked(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @classmethod
    def from_dict(cls, payload: dict) -> SensitivityResult:
        """Back from :meth:`to_dict` (``sensitivity.json``)."""
        layers = [
            LayerSensitivity(**{k: v for k, v in entry.items() if k != "damage_db"})
            for entry in payload["layers"]
        ]
        return cls(**{**payload, "layers": layers})

    def to_dict(self) -> dict:
        payload = asdict(self)
        for layer, entry in zip(self.layers, payload["layers"], strict=True):
            entry["damage_db"] = layer.damage_db
        return payload


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum(ref^2) / sum((ref - approx)^2))``."""
    reference = reference.astype(np.float64)
    noise = float(np.sum((reference - approximation.astype(np.float64)) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(max(signal, np.finfo(np.float64).tiny) / noise))


def conv_layers(model: nn.Module) -> list[str]:
    """The quantized convs (the units the analysis toggles), in model order."""
    modules = dict(model.named_modules())
    return [
        name for name in quantized_layers(model) if isinstance(modules[name], (nn.Conv2d, nn.ConvTranspose2d))
    ]


class _Toggles:
    """Switch the own input/weight quantizers of named layers of one calibrated copy on and off."""

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        from modelopt.torch.quantization.nn import TensorQuantizer

        modules = dict(model.named_modules())
        # Only quantizers enabled by calibration take part (a skipped layer's stay off).
        self.everything = [m for m in model.modules() if isinstance(m, TensorQuantizer) and m.is_enabled]
        self.active = {
            name: [q for q in modules[name].children() if isinstance(q, TensorQuantizer) and q.is_enabled]
            for name in layers
        }

    def set(self, name: str, enabled: bool) -> None:
        for quantizer in self.active[name]:
            quantizer.enable() if enabled else quantizer.disable()

    @contextmanager
    def only(self, name: str) -> Iterator[None]:
        """Every quantizer of the model off (residual Adds and pools too) but ``name``'s."""
        for quantizer in self.everything:
            quantizer.disable()
        self.set(name, True)
        try:
            yield
        finally:
            for quantizer in self.everything:
                quantizer.enable()

    @contextmanager
    def all_but(self, names: Sequence[str]) -> Iterator[None]:
        """Every quantizer on except those of the layers ``names``."""
        for name in names:
            self.set(name, False)
        try:
            yield
        finally:
            for name in names:
                self.set(name, True)


@torch.no_grad()
def _outputs(model: nn.Module, batches: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    boxes, scores = zip(*(model(batch) for batch in batches), strict=True)
    probabilities = torch.cat(scores).clamp(LOGIT_EPS, 1 - LOGIT_EPS)
    return torch.cat(boxes).numpy(), torch.logit(probabilities).numpy()


def analyze(
    fp32: nn.Module,
    calibrated: nn.Module,
    images: np.ndarray,
    *,
    layers: Sequence[str] | None = None,
    evaluate: Evaluate | None = None,
    top_k: int = 8,
    batch_size: int = 8,
    progress: bool = True,
) -> SensitivityResult:
    """Measure every conv of ``calibrated`` (or the ``layers`` given) on ``images`` (N, 3, H, W) float32.

    ``fp32`` is the fused float model the calibrated copy came from. With ``evaluate``, the ``top_k``
    layers by recovery also get mAP with only them kept in FP, and the result records the FP32 and
    all-INT8 mAP. The input models are not modified.
    """
    started = time.perf_counter()
    if len(images) == 0:
        raise NasquantError("sensitivity analysis needs at least one sample image")
    model = copy.deepcopy(calibrated).eval()
    names = list(layers) if layers is not None else conv_layers(model)
    unknown = sorted(set(names) - set(quantized_layers(model)))
    if unknown:
        raise NasquantError(f"not quantized layers: {', '.join(unknown)}")
    toggles = _Toggles(model, names)
    batches = [
        torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))
        for i in range(0, len(images), batch_size)
    ]
    ref_boxes, ref_logits = _outputs(fp32.eval(), batches)
    all_boxes, all_logits = _outputs(model, batches)
    base_boxes, base_logits = sqnr_db(ref_boxes, all_boxes), sqnr_db(ref_logits, all_logits)
    base = (base_boxes + base_logits) / 2

    measured = []
    with tqdm(names, desc="sensitivity", unit="layer", disable=not progress) as bar:
        for name in bar:
            with toggles.only(name):
                only = _outputs(model, batches)
            with toggles.all_but([name]):
                all_but = _outputs(model, batches)
            only_db = (sqnr_db(ref_boxes, only[0]), sqnr_db(ref_logits, only[1]))
            all_but_db = (sqnr_db(ref_boxes, all_but[0]), sqnr_db(ref_logits, all_but[1]))
            recovery = sum(all_but_db) / 2 - base
            measured.append(LayerSensitivity(name, *only_db, *all_but_db, recovery_db=recovery))
    # Deterministic order: by recovery, ties by model order (sort is stable).
    measured.sort(key=lambda layer: -layer.recovery_db)

    result = SensitivityResult(measured, base_boxes, base_logits, len(images), 0.0)
    if evaluate is not None:
        result.map50_95_fp32 = evaluate(fp32)
        result.map50_95_int8 = evaluate(model)
        with tqdm(measured[:top_k], desc="sensitivity mAP", unit="layer", disable=not progress) as bar:
            for layer in bar:
                with toggles.all_but([layer.name]):
                    layer.map50_95_kept_float = evaluate(model)
    result.seconds = time.perf_counter() - started
    return result


def search_fp_layers(
    calibrated: nn.Module,
    result: SensitivityResult,
    evaluate: Evaluate,
    *,
    max_map_drop: float | None,
    max_fp_layers: int | None,
    log: Callable[[str], None] = print,
) -> dict:
    """The smallest recovery-ranked prefix of layers kept in FP whose real mAP meets the budget.

    ``max_map_drop``: the mAP50-95 (fraction) the INT8 model may lose against FP32; ``max_fp_layers``:
    at most this many layers in FP. With only ``max_fp_layers``, the first that many layers are kept.
    Every prefix tried is evaluated (mAP on the validation subset) and recorded; when the budget cannot
    be met within ``max_fp_layers``, the best prefix tried is returned with ``met: false``.
    """
    if max_map_drop is None and max_fp_layers is None:
        raise NasquantError("quantization.skip: auto needs max_map_drop and/or max_fp_layers")
    if result.map50_95_fp32 is None:
        raise NasquantError("the search needs a sensitivity result measured with an evaluate function")
    model = copy.deepcopy(calibrated).eval()
    ranked = result.ranked()
    toggles = _Toggles(model, ranked)
    limit = len(ranked) if max_fp_layers is None else min(max_fp_layers, len(ranked))
    sizes = range(limit + 1) if max_map_drop is not None else [limit]
    tried = []
    for size in sizes:
        kept = ranked[:size]
        with toggles.all_but(kept):
            value = evaluate(model)
        drop = result.map50_95_fp32 - value
        tried.append({"fp_layers": kept, "map50_95": value, "drop": drop})
        log(f"[search] {size} layer(s) in FP: mAP50-95 {value:.4f} (drop {drop:+.4f})")
        if max_map_drop is not None and drop <= max_map_drop:
            break
    met = max_map_drop is None or tried[-1]["drop"] <= max_map_drop
    chosen = tried[-1] if met else min(tried, key=lambda t: (t["drop"], len(t["fp_layers"])))
    return {
        "max_map_drop": max_map_drop,
        "max_fp_layers": max_fp_layers,
        "met": met,
        "chosen": chosen["fp_layers"],
        "map50_95": chosen["map50_95"],
        "drop": chosen["drop"],
        "tried": tried,
    }
