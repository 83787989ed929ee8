"""Stages ``sensitivity`` / ``search`` and the selection: which layers stay in floating point, and why.

``quantization.skip`` lists them, or ``auto`` has the sensitivity search choose; then the returned
recipe names the chosen list, so a rerun of the resolved recipe reproduces it without searching.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from nasquant.artifacts import SENSITIVITY_JSON
from nasquant.data.calibration import select_calibration_images
from nasquant.data.datasets import iter_batches
from nasquant.errors import NasquantError
from nasquant.eval.validate import validate
from nasquant.pipeline.calibrate import Calibrated
from nasquant.pipeline.context import RunContext, cached_stage, stage_key
from nasquant.pipeline.load import Loaded
from nasquant.quant import keep_in_float
from nasquant.quant.sensitivity import SensitivityResult, analyze, search_fp_layers
from nasquant.recipe import Recipe
from nasquant.report.sensitivity import write_sensitivity
from nasquant.runtime import TorchBackend

SENSITIVITY_READS = (
    "quantization.sensitivity_images",
    "quantization.sensitivity_top_k",
    "quantization.sensitivity_val_images",
    "calibration.seed",
    "validation.nms",
    "validation.batch_size",
)
SEARCH_READS = ("quantization.skip", "quantization.max_map_drop", "quantization.max_fp_layers")


@dataclass(frozen=True)
class Sensitivity:
    ranked: list[str]
    search: dict | None
    """``skip: auto``'s choice: ``chosen`` layers, mAP ``drop``, whether the budget was ``met``."""
    seconds: float


@dataclass(frozen=True)
class Selection:
    all_layers: torch.nn.Module
    selective: torch.nn.Module
    skipped: list[str]
    fp_reason: str
    """Why ``skipped`` are the float layers (the recipe's list, the search's choice), for the report."""
    recipe: Recipe
    """The run's recipe from here on (``skip: auto`` replaced by the chosen list)."""


def sensitivity(ctx: RunContext, loaded: Loaded, calibrated: Calibrated) -> Sensitivity:
    """Per-layer sensitivity (and, for ``skip: auto``, the search), with the three evidence files.
    Analysis and search are cached apart: a new budget reuses the measured layers."""
    ctx.recipe.require("validation.data", purpose="to measure sensitivity (and for quantization.skip: auto)")
    fields = ctx.fields(*SENSITIVITY_READS)
    section, validation = fields.quantization, fields.validation
    sample = select_calibration_images(
        loaded.validation,
        num_images=min(section.sensitivity_images, len(loaded.validation)),
        seed=fields.calibration.seed,
    )
    map_subset = loaded.val_subset.first(section.sensitivity_val_images)
    key = stage_key(
        calibrated.key,
        fields.values,
        [p.name for p in sample.image_paths],
        [p.name for p in map_subset.image_paths],
    )

    def evaluate(model: torch.nn.Module) -> float:
        with TorchBackend(model, device="cpu") as backend:
            metrics = validate(
                backend,
                map_subset,
                loaded.spec,
                nms=validation.nms,
                batch_size=validation.batch_size,
                progress=False,
            )
        return metrics["map50_95"]

    evidence = ctx.run_dir / SENSITIVITY_JSON
    measured: list[SensitivityResult] = []

    def compute() -> dict:
        images = np.concatenate([b.images for b in iter_batches(sample, loaded.spec, validation.batch_size)])
        analysis = analyze(
            loaded.detector.model,
            calibrated.model,
            images,
            evaluate=evaluate,
            top_k=section.sensitivity_top_k,
            progress=ctx.progress,
        )
        analysis.map_images = len(map_subset)
        measured.append(analysis)
        return {"ranked": analysis.ranked(), "seconds": analysis.seconds}

    record = cached_stage(
        ctx,
        "sensitivity",
        key,
        compute,
        summary=lambda r: f"{len(r['ranked'])} convs on {len(sample)} images, top: {r['ranked'][0]}",
        outputs=[evidence],
    )
    analysis = measured[0] if measured else _read_evidence(evidence)
    analysis.search = None
    search = ctx.fields(*SEARCH_READS).quantization
    if search.skip == "auto":
        analysis.search = cached_stage(
            ctx,
            "search",
            stage_key(record.key, search.max_map_drop, search.max_fp_layers),
            lambda: search_fp_layers(
                calibrated.model,
                analysis,
                evaluate,
                max_map_drop=search.max_map_drop,
                max_fp_layers=search.max_fp_layers,
                log=ctx.log,
            ),
            summary=lambda r: f"{len(r['chosen'])} layer(s) in FP, met: {r['met']}",
        ).result
    write_sensitivity(ctx.run_dir, analysis, title=f"{ctx.recipe.name}: per-layer INT8 sensitivity")
    return Sensitivity(analysis.ranked(), analysis.search, analysis.seconds)


def _read_evidence(path) -> SensitivityResult:
    try:
        return SensitivityResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise NasquantError(
            f"{path} is damaged ({type(exc).__name__}: {str(exc)[:120]}); run without --resume"
        ) from None


def select(ctx: RunContext, loaded: Loaded, calibrated: Calibrated) -> Selection:
    """The layers kept in floating point: the recipe's patterns, or the sensitivity search's choice."""
    section = ctx.fields("quantization.skip").quantization
    recipe = ctx.recipe
    started = time.perf_counter()
    if section.skip == "auto":
        search = sensitivity(ctx, loaded, calibrated).search
        recipe = replace(recipe, quantization=replace(recipe.quantization, skip=list(search["chosen"])))
        budget = f"mAP drop {search['drop']:+.4f} ({'within' if search['met'] else 'NOT within'} budget)"
        fp_reason = f"chosen by the sensitivity search: {budget}; see sensitivity.md"
    else:
        fp_reason = "from the recipe's quantization.skip"
    selective, skipped = keep_in_float(calibrated.model, recipe.quantization.skip)
    ctx.finished(
        "select", f"kept in floating point ({len(skipped)}): {', '.join(skipped) or 'none'}", started
    )
    return Selection(calibrated.model, selective, skipped, fp_reason, recipe)
