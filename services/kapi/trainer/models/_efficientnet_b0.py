"""EfficientNet-B0 (Tan and Le, 2019): MBConv blocks with squeeze-and-excitation and SiLU.

The B0 stage table; compound scaling goes through `width` (channels, multiples of 8) and
`depth` (repeats, rounded up), so B1-B7 are `width`/`depth` pairs with a larger input. The
head is 4x the last stage's channels (1280 at width 1). Stochastic depth is off unless
`drop_path_rate` is set: it then grows linearly with the block's index, up to that rate.
"""

from __future__ import annotations

import torch
from torch import nn

from kapi.trainer.models._layers import (
    ConvBNAct,
    DropPath,
    classifier,
    init_weights,
    make_divisible,
    require_probability,
    scale_channels,
    scale_repeats,
)
from kapi.trainer.models._registry import register

STEM_CHANNELS = 32
HEAD_EXPANSION = 4
# expansion, kernel, first stride, output channels, repeats (the paper's Table 1)
STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
SE_RATIO = 0.25  # of the block's input channels, as in the reference


class SqueezeExcitation(nn.Module):
    """Channel attention: global pooling, a SiLU bottleneck, a sigmoid gate per channel."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, squeezed, 1),
            nn.SiLU(),
            nn.Conv2d(squeezed, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale: torch.Tensor = self.gate(x)
        return x * scale


class MBConv(nn.Module):
    """Expansion, depthwise convolution, squeeze-and-excitation, linear projection."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int,
        stride: int,
        expansion: int,
        drop_path_rate: float,
    ) -> None:
        super().__init__()
        hidden = make_divisible(in_channels * expansion)
        layers: list[nn.Module] = []
        if hidden != in_channels:
            layers.append(ConvBNAct(in_channels, hidden, 1, activation=nn.SiLU))
        layers += [
            ConvBNAct(hidden, hidden, kernel_size, stride=stride, groups=hidden,
                      activation=nn.SiLU),
            SqueezeExcitation(hidden, max(1, int(in_channels * SE_RATIO))),
            ConvBNAct(hidden, out_channels, 1, activation=None),
        ]  # fmt: skip
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels
        self.drop_path = DropPath(drop_path_rate if self.residual else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.block(x)
        return x + self.drop_path(out) if self.residual else out


@register("efficientnet_b0")
class EfficientNetB0(nn.Module):
    """EfficientNet-B0 for `in_channels`-channel images of any size."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        width: float = 1.0,
        depth: float = 1.0,
        dropout: float = 0.2,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        require_probability("drop_path_rate", drop_path_rate)
        channels = scale_channels(STEM_CHANNELS, width)
        layers: list[nn.Module] = [ConvBNAct(in_channels, channels, stride=2, activation=nn.SiLU)]
        repeats = [scale_repeats(stage[-1], depth) for stage in STAGES]
        index, total = 0, sum(repeats)
        for (expansion, kernel_size, stride, base, _), count in zip(STAGES, repeats, strict=True):
            out_channels = scale_channels(base, width)
            for repeat in range(count):
                layers.append(MBConv(
                    channels, out_channels, kernel_size=kernel_size,
                    stride=stride if repeat == 0 else 1, expansion=expansion,
                    drop_path_rate=drop_path_rate * index / total,
                ))  # fmt: skip
                channels, index = out_channels, index + 1
        head = HEAD_EXPANSION * channels
        layers.append(ConvBNAct(channels, head, 1, activation=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.classifier = classifier(head, num_classes, dropout)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits
