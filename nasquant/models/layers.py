"""Building blocks of YOLO-NAS, named so their state-dict keys are super-gradients' own.

Attribute names and registration order are part of the contract: official checkpoints load with
``strict=True`` only if every key, its order and its shape match super-gradients 3.7.1.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: super-gradients builds YOLO-NAS with ``bn_eps=1e-3`` for every BatchNorm (not torch's 1e-5).
BN_EPS = 1e-3


def _batchnorm_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


def fold_batchnorm(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the conv weight and bias that equal ``bn(conv(x))`` for a BatchNorm in eval mode."""
    scale = _batchnorm_scale(bn)
    folded_weight = weight * scale.reshape(-1, 1, 1, 1)
    conv_bias = bias if bias is not None else torch.zeros_like(bn.running_mean)
    folded_bias = (conv_bias - bn.running_mean) * scale + bn.bias
    return folded_weight.detach(), folded_bias.detach()


@dataclass(frozen=True)
class HalfFactors:
    """A folded conv weight as exactly ``half_weight.float() * channel_scale`` (per output channel).

    Recorded when the weight before folding was exactly representable in float16 (checkpoints saved
    in half precision, as Ultralytics saves them): an export can then store the weight in half the
    bytes and rebuild the very same float32 values (see :func:`nasquant.export.onnx.store_half_float_weights`).
    """

    half_weight: torch.Tensor
    channel_scale: torch.Tensor


#: The attribute of a folded ``nn.Conv2d`` holding its :class:`HalfFactors`, when it has them.
HALF_FACTORS_ATTRIBUTE = "half_factors"


def _fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    weight, bias = fold_batchnorm(conv.weight, conv.bias, bn)
    unfolded = conv.weight.detach()
    if conv.bias is None and torch.equal(unfolded.half().float(), unfolded):
        factors = HalfFactors(unfolded.half(), _batchnorm_scale(bn).detach().reshape(-1, 1, 1, 1))
        setattr(conv, HALF_FACTORS_ATTRIBUTE, factors)
    conv.weight = nn.Parameter(weight)
    conv.bias = nn.Parameter(bias)


class ConvBNAct(nn.Module):
    """Conv (no bias) → BatchNorm → ReLU; super-gradients' ``Conv`` (keys ``conv.*``, ``bn.*``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    @property
    def is_folded(self) -> bool:
        return isinstance(self.bn, nn.Identity)

    def fold(self) -> None:
        """Fold the BatchNorm into the conv (adds ``conv.bias``, removes ``bn.*``)."""
        if not self.is_folded:
            _fold_into_conv(self.conv, self.bn)
            self.bn = nn.Identity()


class SeqConvBNReLU(nn.Module):
    """The same Conv → BN → ReLU, but with super-gradients' ``ConvBNReLU`` key layout (``seq.conv``...).

    The detection heads use this older module, so its keys carry the extra ``seq.`` level.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, kernel, 1, kernel // 2, bias=False),
                bn=nn.BatchNorm2d(out_channels, eps=BN_EPS),
                act=nn.ReLU(inplace=True),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)

    @property
    def is_folded(self) -> bool:
        return isinstance(self.seq.bn, nn.Identity)

    def fold(self) -> None:
        if not self.is_folded:
            _fold_into_conv(self.seq.conv, self.seq.bn)
            self.seq.bn = nn.Identity()


class QARepVGGBlock(nn.Module):
    """QARepVGG block (arXiv 2212.01593): 3x3 conv+BN, 1x1 conv+bias and identity, summed, then BN, ReLU.

    Three layouts, matching what checkpoints in the wild hold:

    * ``unfused`` (training form): all branches; ``rbr_reparam`` is registered but unused, as in
      super-gradients, because official checkpoints carry its tensors.
    * ``partial``: branches merged into ``rbr_reparam`` (what super-gradients' default
      ``prep_model_for_conversion`` produces); ``post_bn`` kept.
    * ``fused``: ``post_bn`` folded too, a single conv + bias + ReLU: the deployment form.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, residual: bool = True) -> None:
        super().__init__()
        if residual and (in_channels != out_channels or stride != 1):
            raise ValueError("a residual QARepVGG block needs in_channels == out_channels and stride 1")
        self.residual = residual
        self.nonlinearity = nn.ReLU(inplace=True)
        self.branch_3x3 = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
                bn=nn.BatchNorm2d(out_channels, eps=BN_EPS),
            )
        )
        self.branch_1x1 = nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=True)
        self.post_bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.rbr_reparam = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=True)
        self.layout = "unfused"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "fused":
            return self.nonlinearity(self.rbr_reparam(x))
        if self.layout == "partial":
            return self.nonlinearity(self.post_bn(self.rbr_reparam(x)))
        y = self.branch_3x3(x) + self.branch_1x1(x)
        if self.residual:
            y = y + x
        return self.nonlinearity(self.post_bn(y))

    def _equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        kernel, bias = fold_batchnorm(self.branch_3x3.conv.weight, None, self.branch_3x3.bn)
        kernel = kernel + F.pad(self.branch_1x1.weight, [1, 1, 1, 1])
        bias = bias + self.branch_1x1.bias
        if self.residual:
            # The identity branch is a 3x3 kernel with a single 1 at the centre of channel i -> i.
            identity = torch.zeros_like(kernel)
            channels = torch.arange(kernel.shape[0])
            identity[channels, channels, 1, 1] = 1.0
            kernel = kernel + identity
        return kernel.detach(), bias.detach()

    def drop_branches(self) -> None:
        """Switch to the ``partial`` layout without computing anything (used before loading such a checkpoint)."""
        del self.branch_3x3
        del self.branch_1x1
        self.layout = "partial"

    def drop_post_bn(self) -> None:
        """Switch from ``partial`` to ``fused`` without computing anything (before loading a fused checkpoint)."""
        del self.post_bn
        self.layout = "fused"

    @torch.no_grad()
    def reparameterize(self, keep_post_bn: bool = False) -> None:
        """Merge every branch (and, unless ``keep_post_bn``, the post-BN) into ``rbr_reparam``; idempotent."""
        if self.layout == "unfused":
            kernel, bias = self._equivalent_kernel_bias()
            self.rbr_reparam.weight.copy_(kernel)
            self.rbr_reparam.bias.copy_(bias)
            self.drop_branches()
        if self.layout == "partial" and not keep_post_bn:
            _fold_into_conv(self.rbr_reparam, self.post_bn)
            self.drop_post_bn()


def fuse_modules(model: nn.Module) -> nn.Module:
    """Re-parameterize every QARepVGG block and fold every Conv→BN pair, in place."""
    for module in model.modules():
        if isinstance(module, QARepVGGBlock):
            module.reparameterize()
        elif isinstance(module, ConvBNAct | SeqConvBNReLU):
            module.fold()
    return model
