"""Quantization-aware distillation: fine-tune a calibrated, fake-quantized model toward the float
model's own outputs on the calibration images. No labels.

ModelOpt's QAT mechanics: a calibrated model is already trainable. Its quantizers fake-quantize in
the forward pass with a straight-through gradient and keep the calibrated ranges (``amax`` is a
buffer, not a parameter); the weights and biases learn. The network was fused before quantization, so
no BatchNorm is left to drift: BN is frozen by construction.

With ``learn_ranges``, the ranges learn too (LSQ, Esser et al. 2020). ModelOpt's INT8 fake quantizer
gives ``amax`` no gradient (its learned-range mode exists for block-scaled formats only), so for the
duration of the fine-tuning each calibrated quantizer runs through a ModelOpt functional backend
(:func:`modelopt.torch.quantization.nn.register_quant_backend`) that computes
``int_cast_ste(x / s) * s`` with ``s = exp(log_amax) / maxbound``: ModelOpt's own rounding with a
straight-through estimator, through which the step size receives LSQ's gradient. ``log_amax`` starts at
the calibrated range and learns at its own rate (a relative step, whatever the tensor's scale); on exit
the learned ranges are written back as the quantizers' ``amax``, and export is ModelOpt's as before.

The teacher is the FP32 network, the target its raw head outputs, level by level:

* class logits: the KL divergence between the student's and the teacher's per-class Bernoulli
  (sigmoid) distributions, averaged over anchors and classes;
* box distributions (DFL): KL(teacher ‖ student) of each side's softmax over the ``reg_max + 1`` bins,
  weighted by the teacher's highest class probability at the anchor (a background anchor's box is never
  drawn), normalised by the weights' sum.

Both terms are zero exactly when the student reproduces the teacher. Each step takes the next batch of
calibration images (a seeded shuffle of the batches per pass), each image flipped left-right with
probability 1/2, both networks seeing the same batch; Adam with a cosine decay of the learning rate to 0.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from modelopt.torch.quantization.nn import (
    TensorQuantizer,
    is_registered_quant_backend,
    register_quant_backend,
)
from modelopt.torch.quantization.tensor_quant import int_cast_ste
from torch import nn
from tqdm import tqdm

from nasquant.errors import NasquantError
from nasquant.models.yolo_nas import DFLHead

#: The ModelOpt functional backend under which a quantizer fake-quantizes with a learnable range.
LEARNED_RANGE_BACKEND = "nasquant-learned-range"


@dataclass(frozen=True)
class Distillation:
    """A fine-tuned copy of a quantized model and the loss of each step."""

    model: nn.Module
    losses: list[float] = field(repr=False)

    @property
    def first_loss(self) -> float:
        """The mean loss over the first tenth of the steps."""
        return float(np.mean(self.losses[: self._span]))

    @property
    def last_loss(self) -> float:
        """The mean loss over the last tenth of the steps."""
        return float(np.mean(self.losses[-self._span :]))

    @property
    def _span(self) -> int:
        return max(1, len(self.losses) // 10)


@contextmanager
def head_outputs(model: nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """A list that each forward pass of ``model`` extends with every level's (box, class) logits, for
    as long as the context is open."""
    heads = [module for module in model.modules() if isinstance(module, DFLHead)]
    if not heads:
        raise NasquantError("distillation needs a YOLO-NAS model: no detection head found")
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = [head.register_forward_hook(lambda _m, _i, output: outputs.append(output)) for head in heads]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _fake_quantize_with_learned_range(inputs: torch.Tensor, quantizer: TensorQuantizer) -> torch.Tensor:
    """``inputs`` on the quantizer's integer grid, its step size derived from the ``log_amax`` parameter
    (see the module docstring)."""
    step = quantizer.log_amax.exp() / quantizer.maxbound
    return int_cast_ste(inputs / step, quantizer.num_bits, quantizer.unsigned, quantizer.narrow_range) * step


@contextmanager
def learned_ranges(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """While open, every calibrated, enabled quantizer of ``model`` fake-quantizes with a learnable range
    (its ``log_amax`` parameter, starting at the calibrated ``amax``); the context yields those
    parameters. On exit each range that moved becomes the quantizer's ``amax``."""
    if not is_registered_quant_backend(LEARNED_RANGE_BACKEND):
        register_quant_backend(LEARNED_RANGE_BACKEND, _fake_quantize_with_learned_range)
    quantizers = [
        module
        for module in model.modules()
        if isinstance(module, TensorQuantizer) and module.is_enabled and module.amax is not None
    ]
    if any(isinstance(quantizer.num_bits, tuple) or quantizer.block_sizes for quantizer in quantizers):
        raise NasquantError("learned ranges cover integer per-tensor and per-channel quantizers only")
    backends = [quantizer.backend for quantizer in quantizers]
    for quantizer in quantizers:
        quantizer.log_amax = nn.Parameter(quantizer.amax.detach().float().clamp_min(1e-8).log())
        quantizer.backend = LEARNED_RANGE_BACKEND
    starts = [quantizer.log_amax.detach().clone() for quantizer in quantizers]
    try:
        yield [quantizer.log_amax for quantizer in quantizers]
    finally:
        for quantizer, backend, start in zip(quantizers, backends, starts, strict=True):
            if not torch.equal(quantizer.log_amax, start):  # exp(log(amax)) may differ from amax by an ulp
                quantizer.amax = quantizer.log_amax.detach().exp().to(quantizer.amax.dtype)
            del quantizer.log_amax
            quantizer.backend = backend


def distillation_loss(
    student: list[tuple[torch.Tensor, torch.Tensor]], teacher: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Class-logit KL plus teacher-weighted DFL KL over every level (see the module docstring)."""
    class_sum = box_sum = weight_sum = 0.0
    class_count = 0
    for (student_box, student_cls), (teacher_box, teacher_cls) in zip(student, teacher, strict=True):
        probability = teacher_cls.sigmoid()
        class_kl = F.binary_cross_entropy_with_logits(
            student_cls, probability, reduction="none"
        ) - F.binary_cross_entropy_with_logits(teacher_cls, probability, reduction="none")
        class_sum = class_sum + class_kl.sum()
        class_count += class_kl.numel()
        batch, channels, height, width = teacher_box.shape
        bins = channels // 4
        teacher_log = teacher_box.reshape(batch, 4, bins, height * width).log_softmax(dim=2)
        student_log = student_box.reshape(batch, 4, bins, height * width).log_softmax(dim=2)
        box_kl = (teacher_log.exp() * (teacher_log - student_log)).sum(dim=2).mean(dim=1)  # (B, HW)
        weight = probability.amax(dim=1).reshape(batch, height * width)
        box_sum = box_sum + (box_kl * weight).sum()
        weight_sum = weight_sum + weight.sum()
    return class_sum / class_count + box_sum / weight_sum.clamp_min(1e-6)


@torch.no_grad()
def mean_distillation_loss(model: nn.Module, teacher: nn.Module, batches: Sequence[np.ndarray]) -> float:
    """How far ``model``'s head outputs are from ``teacher``'s on ``batches`` (preprocessed images, as
    given: no flips): :func:`distillation_loss` averaged over the images. On images the distillation
    never saw, it tells whether it generalises, without labels."""
    if not batches:
        raise NasquantError("the distillation loss needs at least one image")
    total = 0.0
    with head_outputs(model) as student_outputs, head_outputs(teacher) as teacher_outputs:
        for batch in batches:
            student_outputs.clear()
            teacher_outputs.clear()
            images = torch.from_numpy(batch)
            teacher(images)
            model(images)
            total += float(distillation_loss(student_outputs, teacher_outputs)) * len(batch)
    return total / sum(len(batch) for batch in batches)


def distill(
    model: nn.Module,
    teacher: nn.Module,
    batches: Sequence[np.ndarray],
    *,
    steps: int,
    learning_rate: float,
    range_learning_rate: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> Distillation:
    """A copy of the calibrated ``model`` fine-tuned for ``steps`` toward the float ``teacher``'s head
    outputs on ``batches`` (preprocessed calibration images); ``model`` and ``teacher`` are untouched.
    With ``range_learning_rate``, the quantizers' ranges learn too, at that rate (on ``log amax``)."""
    if steps < 1:
        raise NasquantError(f"distillation needs at least one step, got {steps}")
    if not batches:
        raise NasquantError("distillation received no images")
    student = copy.deepcopy(model).to(device).eval()  # eval: nothing in the fused network trains differently
    teacher = copy.deepcopy(teacher).to(device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    trained = [p for name, p in student.named_parameters() if "_quantizer" not in name]
    for parameter in trained:
        parameter.requires_grad_(True)
    with learned_ranges(student) if range_learning_rate else nullcontext([]) as ranges:
        groups = [{"params": trained}]
        if ranges:
            groups.append({"params": ranges, "lr": range_learning_rate})
        losses = _train(student, teacher, batches, groups, steps, learning_rate, seed, device, progress)
    for parameter in trained:
        parameter.requires_grad_(False)
    return Distillation(student.cpu().eval(), losses)


def _train(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[np.ndarray],
    groups: list[dict],
    steps: int,
    learning_rate: float,
    seed: int,
    device: str,
    progress: bool,
) -> list[float]:
    """Adam on the parameter ``groups`` for ``steps`` (see the module docstring); the loss of each step."""
    optimizer = torch.optim.Adam(groups, lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = np.random.default_rng(seed)
    losses: list[float] = []
    order: list[int] = []
    steps_bar = tqdm(range(steps), desc="distill", unit="step", disable=not progress)
    with head_outputs(student) as student_outputs, head_outputs(teacher) as teacher_outputs, steps_bar as bar:
        for _ in bar:
            if not order:
                order = list(generator.permutation(len(batches)))
            images = torch.from_numpy(_flipped(batches[order.pop()], generator)).to(device)
            student_outputs.clear()
            teacher_outputs.clear()
            with torch.no_grad():
                teacher(images)
            student(images)
            loss = distillation_loss(student_outputs, teacher_outputs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.detach().item())
            bar.set_postfix(loss=f"{losses[-1]:.2e}", refresh=False)
    return losses


def _flipped(batch: np.ndarray, generator: np.random.Generator) -> np.ndarray:
    """``batch`` (N, C, H, W) with each image mirrored left-right with probability 1/2."""
    flip = generator.random(len(batch)) < 0.5
    return np.ascontiguousarray(np.where(flip[:, None, None, None], batch[..., ::-1], batch))
