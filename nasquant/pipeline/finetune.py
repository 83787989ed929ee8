"""Stage ``finetune``: quantization-aware distillation of each INT8 model (``finetune.enabled``), after
the selection and before export, cached as ``finetuned.<model>.safetensors``.

It trains on the calibration images only (which the overlap guard already checked against the
validation set), toward the FP32 model's outputs: no labels. Bias correction, at export, then
measures whatever mean shift the fine-tuned weights still leave.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nasquant.artifacts import finetuned_name
from nasquant.data.datasets import iter_batches
from nasquant.errors import NasquantError
from nasquant.pipeline.calibrate import Calibrated
from nasquant.pipeline.context import RunContext, cached_stage, stage_key
from nasquant.pipeline.load import Loaded
from nasquant.pipeline.select import Selection
from nasquant.quant.distill import distill
from nasquant.quant.state import write_tensors
from nasquant.runtime.torch_backend import resolve_device

READS = (
    "finetune.enabled",
    "finetune.steps",
    "finetune.learning_rate",
    "finetune.learn_ranges",
    "finetune.range_learning_rate",
    "finetune.batch_size",
    "finetune.seed",
    "finetune.device",
    "quantization.quantize_all_baseline",
)


def finetune(ctx: RunContext, loaded: Loaded, calibrated: Calibrated, selection: Selection) -> Selection:
    """``selection`` with its INT8 models distilled (the selective one, and the quantize-everything
    baseline when the report has it); unchanged when ``finetune.enabled`` is false."""
    fields = ctx.fields(*READS)
    section = fields.finetune
    if not section.enabled:
        return selection
    models = {"model.int8": selection.selective}
    if fields.quantization.quantize_all_baseline:
        models["model.int8-all"] = selection.all_layers
    paths = {stem: ctx.run_dir / finetuned_name(stem) for stem in models}
    key = stage_key(loaded.key, calibrated.key, selection.skipped, fields.values)
    device = resolve_device(section.device)
    tuned: dict[str, torch.nn.Module] = {}

    def compute() -> dict:
        batches = [b.images for b in iter_batches(calibrated.images, loaded.spec, section.batch_size)]
        result = {}
        for stem, model in models.items():
            ctx.log(f"[finetune] {stem}: {section.steps} steps on {len(calibrated.images)} images ({device})")
            distilled = distill(
                model,
                loaded.detector.model,
                batches,
                steps=section.steps,
                learning_rate=section.learning_rate,
                range_learning_rate=section.range_learning_rate if section.learn_ranges else None,
                seed=section.seed,
                device=str(device),
                progress=ctx.progress,
            )
            state = distilled.model.state_dict()
            write_tensors(paths[stem], {name: t.detach().cpu().contiguous() for name, t in state.items()})
            tuned[stem] = distilled.model
            result[stem] = {"first_loss": distilled.first_loss, "last_loss": distilled.last_loss}
        return result

    record = cached_stage(
        ctx,
        "finetune",
        key,
        compute,
        summary=lambda result: "; ".join(
            f"{stem} distillation loss {losses['first_loss']:.2e} → {losses['last_loss']:.2e}"
            for stem, losses in result.items()
        ),
        outputs=list(paths.values()),
    )
    if record.reused:
        tuned = {stem: _load(models[stem], paths[stem]) for stem in models}
    return replace(
        selection,
        selective=tuned["model.int8"],
        all_layers=tuned.get("model.int8-all", selection.all_layers),
    )


def _load(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """A copy of the selected ``model`` with the fine-tuned weights (and ranges) stored at ``path``."""
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise NasquantError(
            f"cannot read fine-tuned weights {path}: {exc}; delete it to fine-tune again"
        ) from None
    tuned = copy.deepcopy(model)
    try:
        tuned.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise NasquantError(
            f"{path} does not fit this model ({str(exc)[:160]}); delete it to fine-tune again"
        ) from None
    return tuned
