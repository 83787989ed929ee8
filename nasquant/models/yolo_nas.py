"""YOLO-NAS S/M/L: the same function as super-gradients 3.7.1's ``YoloNAS_{S,M,L}``.

A variant is a frozen dataclass (the numbers of super-gradients' ``yolo_nas_*_arch_params.yaml``,
with its width/depth multipliers already applied) and :func:`yolo_nas` builds the network from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from nasquant.errors import NasquantError
from nasquant.models.layers import ConvBNAct, QARepVGGBlock, SeqConvBNReLU, fuse_modules
from nasquant.settings import VARIANTS


@dataclass(frozen=True)
class StageSpec:
    """One CSP stage: output channels, bottleneck count, bottleneck width, dense concatenation."""

    out_channels: int
    num_blocks: int
    hidden_channels: int
    concat_intermediates: bool = False


@dataclass(frozen=True)
class YoloNASConfig:
    name: str
    stem_channels: int
    backbone: tuple[StageSpec, StageSpec, StageSpec, StageSpec]
    neck: tuple[StageSpec, StageSpec, StageSpec, StageSpec]  # up, up, down, down
    head_channels: tuple[int, int, int]
    spp_kernels: tuple[int, ...] = (5, 9, 13)
    strides: tuple[int, int, int] = (8, 16, 32)
    reg_max: int = 16


YOLO_NAS_S = YoloNASConfig(
    name="yolo_nas_s",
    stem_channels=48,
    backbone=(StageSpec(96, 2, 32), StageSpec(192, 3, 64), StageSpec(384, 5, 96), StageSpec(768, 2, 192)),
    neck=(StageSpec(192, 2, 64), StageSpec(96, 2, 48), StageSpec(192, 2, 64), StageSpec(384, 2, 64)),
    head_channels=(64, 128, 256),
)
YOLO_NAS_M = YoloNASConfig(
    name="yolo_nas_m",
    stem_channels=48,
    backbone=(
        StageSpec(96, 2, 64, True),
        StageSpec(192, 3, 128, True),
        StageSpec(384, 5, 256, True),
        StageSpec(768, 2, 384, False),
    ),
    neck=(StageSpec(192, 2, 192), StageSpec(96, 3, 64), StageSpec(192, 2, 192), StageSpec(384, 3, 256)),
    head_channels=(96, 192, 384),
)
YOLO_NAS_L = YoloNASConfig(
    name="yolo_nas_l",
    stem_channels=48,
    backbone=(
        StageSpec(96, 2, 96, True),
        StageSpec(192, 3, 128, True),
        StageSpec(384, 5, 256, True),
        StageSpec(768, 2, 512, True),
    ),
    neck=(StageSpec(192, 4, 128), StageSpec(96, 4, 128), StageSpec(192, 4, 128), StageSpec(384, 4, 256)),
    head_channels=(128, 256, 512),
)

CONFIGS: dict[str, YoloNASConfig] = {c.name: c for c in (YOLO_NAS_S, YOLO_NAS_M, YOLO_NAS_L)}


class _BlockFactory(Protocol):
    def __call__(self, channels: int) -> nn.Module: ...


class Bottleneck(nn.Module):
    """Two blocks with a residual scaled by a learnable ``alpha`` (registered first: its key precedes cv1's)."""

    def __init__(self, channels: int, block: _BlockFactory) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1))
        self.cv1 = block(channels)
        self.cv2 = block(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x + self.cv2(self.cv1(x))


class CSPLayer(nn.Module):
    """Cross-stage partial layer: two 1x1 paths, one through the bottlenecks, concatenated, then 1x1."""

    def __init__(self, in_channels: int, spec: StageSpec, block: _BlockFactory) -> None:
        super().__init__()
        hidden = spec.hidden_channels
        concat_width = hidden * (2 + spec.num_blocks * spec.concat_intermediates)
        self.concat_intermediates = spec.concat_intermediates
        self.conv1 = ConvBNAct(in_channels, hidden, 1)
        self.conv2 = ConvBNAct(in_channels, hidden, 1)
        self.conv3 = ConvBNAct(concat_width, spec.out_channels, 1)
        self.bottlenecks = nn.Sequential(*(Bottleneck(hidden, block) for _ in range(spec.num_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.conv1(x)
        if self.concat_intermediates:
            parts = [path]
            for bottleneck in self.bottlenecks:
                parts.append(bottleneck(parts[-1]))
        else:
            parts = [self.bottlenecks(path)]
        return self.conv3(torch.cat([*parts, self.conv2(x)], dim=1))


def _qarepvgg(channels: int) -> nn.Module:
    return QARepVGGBlock(channels, channels)


def _conv3x3(channels: int) -> nn.Module:
    return ConvBNAct(channels, channels, 3)


class Stem(nn.Module):
    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.conv = QARepVGGBlock(3, out_channels, stride=2, residual=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class BackboneStage(nn.Module):
    """Stride-2 QARepVGG downsample, then a CSP layer of QARepVGG bottlenecks."""

    def __init__(self, in_channels: int, spec: StageSpec) -> None:
        super().__init__()
        self.downsample = QARepVGGBlock(in_channels, spec.out_channels, stride=2, residual=False)
        self.blocks = CSPLayer(spec.out_channels, spec, _qarepvgg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class SPP(nn.Module):
    """Spatial pyramid pooling: 1x1 halving, max-pools of several sizes, concat, 1x1."""

    def __init__(self, channels: int, kernels: tuple[int, ...]) -> None:
        super().__init__()
        hidden = channels // 2
        self.cv1 = ConvBNAct(channels, hidden, 1)
        self.cv2 = ConvBNAct(hidden * (len(kernels) + 1), channels, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x, *(pool(x) for pool in self.m)], dim=1))


class Backbone(nn.Module):
    def __init__(self, config: YoloNASConfig) -> None:
        super().__init__()
        self.stem = Stem(config.stem_channels)
        channels = config.stem_channels
        for index, spec in enumerate(config.backbone, start=1):
            self.add_module(f"stage{index}", BackboneStage(channels, spec))
            channels = spec.out_channels
        self.context_module = SPP(channels, config.spp_kernels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        c2 = self.stage1(x)
        c3 = self.stage2(c2)
        c4 = self.stage3(c3)
        c5 = self.context_module(self.stage4(c4))
        return [c2, c3, c4, c5]


class UpStage(nn.Module):
    """Upsample the deep input, join two reduced skips (the finer one strided down), CSP."""

    def __init__(self, in_channels: int, skip1_channels: int, skip2_channels: int, spec: StageSpec) -> None:
        super().__init__()
        out = spec.out_channels
        self.reduce_skip1 = ConvBNAct(skip1_channels, out, 1)
        self.reduce_skip2 = ConvBNAct(skip2_channels, out, 1)
        self.conv = ConvBNAct(in_channels, out, 1)
        self.upsample = nn.ConvTranspose2d(out, out, kernel_size=2, stride=2)
        self.downsample = ConvBNAct(out, out, 3, stride=2)
        self.reduce_after_concat = ConvBNAct(3 * out, out, 1)
        self.blocks = CSPLayer(out, spec, _qarepvgg)

    def forward(
        self, x: torch.Tensor, skip1: torch.Tensor, skip2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lateral = self.conv(x)
        joined = torch.cat(
            [self.upsample(lateral), self.reduce_skip1(skip1), self.downsample(self.reduce_skip2(skip2))],
            dim=1,
        )
        return lateral, self.blocks(self.reduce_after_concat(joined))


class DownStage(nn.Module):
    """Stride-2 conv to half the output width, concat with the lateral skip, CSP of 3x3 convs."""

    def __init__(self, in_channels: int, skip_channels: int, spec: StageSpec) -> None:
        super().__init__()
        half = spec.out_channels // 2
        self.conv = ConvBNAct(in_channels, half, 3, stride=2)
        self.blocks = CSPLayer(half + skip_channels, spec, _conv3x3)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.blocks(torch.cat([self.conv(x), skip], dim=1))


class PANNeck(nn.Module):
    def __init__(self, config: YoloNASConfig) -> None:
        super().__init__()
        c2, c3, c4, c5 = (spec.out_channels for spec in config.backbone)
        up1, up2, down1, down2 = config.neck
        self.neck1 = UpStage(c5, c4, c3, up1)
        self.neck2 = UpStage(up1.out_channels, c3, c2, up2)
        self.neck3 = DownStage(up2.out_channels, up2.out_channels, down1)
        self.neck4 = DownStage(down1.out_channels, up1.out_channels, down2)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c2, c3, c4, c5 = features
        lateral1, x = self.neck1(c5, c4, c3)
        lateral2, p3 = self.neck2(x, c3, c2)
        p4 = self.neck3(p3, lateral2)
        p5 = self.neck4(p4, lateral1)
        return p3, p4, p5


class DFLHead(nn.Module):
    """One level's decoupled head: shared 1x1 stem, class and box towers, 1x1 predictions."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, reg_max: int) -> None:
        super().__init__()
        self.stem = SeqConvBNReLU(in_channels, channels, 1)
        self.cls_convs = nn.Sequential(SeqConvBNReLU(channels, channels, 3))
        self.reg_convs = nn.Sequential(SeqConvBNReLU(channels, channels, 3))
        self.cls_pred = nn.Conv2d(channels, num_classes, 1)
        self.reg_pred = nn.Conv2d(channels, 4 * (reg_max + 1), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        return self.reg_pred(self.reg_convs(x)), self.cls_pred(self.cls_convs(x))


class NDFLHeads(nn.Module):
    """Three heads plus distribution-focal-loss decoding into xyxy boxes (input pixels) and sigmoid scores."""

    def __init__(self, in_channels: tuple[int, ...], config: YoloNASConfig, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = config.reg_max
        self.strides = config.strides
        for index, (channels_in, channels) in enumerate(
            zip(in_channels, config.head_channels, strict=True), 1
        ):
            self.add_module(f"head{index}", DFLHead(channels_in, channels, num_classes, config.reg_max))
        # Not persistent: super-gradients keeps the DFL bin positions out of the state dict too.
        self.register_buffer("bins", torch.arange(config.reg_max + 1, dtype=torch.float32), persistent=False)

    def forward(self, features: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        boxes, logits = [], []
        for index, (feature, stride) in enumerate(zip(features, self.strides, strict=True), 1):
            batch, _, height, width = feature.shape
            reg, cls = getattr(self, f"head{index}")(feature)
            # reg channels are side-major: 4 groups (l, t, r, b) of reg_max+1 bins each.
            reg = reg.reshape(batch, 4, self.reg_max + 1, height * width).softmax(dim=2)
            # Expected bin position per side as a (1, bins) @ (bins, HW) product: ONNX Runtime runs the
            # equivalent Einsum several times slower than this MatMul on CPU.
            distances = (self.bins.to(reg.dtype)[None, :] @ reg).squeeze(2).permute(0, 2, 1)  # (B, HW, 4)
            anchors = self._anchor_points(height, width, reg)
            left_top, right_bottom = distances[..., :2], distances[..., 2:]
            boxes.append(torch.cat([anchors - left_top, anchors + right_bottom], dim=-1) * stride)
            logits.append(cls.reshape(batch, self.num_classes, height * width))
        scores = torch.cat(logits, dim=2).permute(0, 2, 1).sigmoid()
        return torch.cat(boxes, dim=1), scores

    @staticmethod
    def _anchor_points(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """Grid-cell centres (x + 0.5, y + 0.5) in feature units, row-major: shape (HW, 2)."""
        ys = torch.arange(height, device=like.device, dtype=torch.float32) + 0.5
        xs = torch.arange(width, device=like.device, dtype=torch.float32) + 0.5
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2).to(like.dtype)


class YoloNAS(nn.Module):
    """YOLO-NAS. ``forward(images)`` returns ``(boxes, scores)``: (N, A, 4) xyxy pixels, (N, A, C) in [0, 1]."""

    def __init__(self, config: YoloNASConfig, num_classes: int = 80) -> None:
        super().__init__()
        if num_classes < 1:
            raise NasquantError(f"num_classes must be a positive integer, got {num_classes}")
        self.config = config
        self.num_classes = num_classes
        self.backbone = Backbone(config)
        self.neck = PANNeck(config)
        neck_channels = (
            config.neck[1].out_channels,
            config.neck[2].out_channels,
            config.neck[3].out_channels,
        )
        self.heads = NDFLHeads(neck_channels, config, num_classes)

    @property
    def variant(self) -> str:
        return self.config.name

    @property
    def is_fused(self) -> bool:
        return all(block.layout == "fused" for block in self.modules() if isinstance(block, QARepVGGBlock))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.neck(self.backbone(images)))

    def fuse(self) -> YoloNAS:
        """Re-parameterize for deployment, in place: every QARepVGG block and Conv+BN becomes one conv + bias."""
        fuse_modules(self)
        return self

    def adopt_layout(self, state_dict: dict[str, torch.Tensor]) -> YoloNAS:
        """Switch blocks to the (partially) fused layout a state dict was saved in, so it loads strictly."""
        for name, module in self.named_modules():
            if isinstance(module, QARepVGGBlock) and f"{name}.branch_3x3.conv.weight" not in state_dict:
                if module.layout == "unfused":
                    module.drop_branches()
                if f"{name}.post_bn.weight" not in state_dict and module.layout == "partial":
                    module.drop_post_bn()
            elif isinstance(module, ConvBNAct | SeqConvBNReLU) and not module.is_folded:
                prefix = f"{name}.seq" if isinstance(module, SeqConvBNReLU) else name
                if f"{prefix}.bn.weight" not in state_dict and f"{prefix}.conv.bias" in state_dict:
                    module.fold()
        return self


def yolo_nas(variant: str, num_classes: int = 80) -> YoloNAS:
    """Build an unfused, randomly initialised YOLO-NAS (``"yolo_nas_s"``, ``"yolo_nas_m"``, ``"yolo_nas_l"``)."""
    name = normalize_variant(variant)
    return YoloNAS(CONFIGS[name], num_classes)


def normalize_variant(variant: str) -> str:
    """Accept ``s``, ``S``, ``yolo_nas_s`` and ``yolo-nas-s``; reject anything else with the allowed names."""
    key = variant.strip().lower().replace("-", "_")
    name = key if key.startswith("yolo_nas_") else f"yolo_nas_{key}"
    if name not in CONFIGS:
        raise NasquantError(f"unknown YOLO-NAS variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return name
